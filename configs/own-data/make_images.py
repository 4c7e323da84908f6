"""Writes this example's images/ and manifest.jsonl: 12 small drawings, each with a short and a dense caption.

Run once (the outputs are committed): python configs/own-data/make_images.py. Your own data replaces both:
any images, and one manifest line per image naming its captions.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 64
COLOURS = {"red": (215, 40, 40), "blue": (45, 80, 225), "green": (40, 170, 60), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
PLACES = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
          "center": (32, 32)}
# (name, shape, colour, background, place, a second object or None)
SCENES = [
    ("red-circle", "circle", "red", "white", "center", None),
    ("blue-square", "square", "blue", "white", "top left", None),
    ("green-triangle", "triangle", "green", "black", "bottom right", None),
    ("yellow-circle", "circle", "yellow", "black", "top right", None),
    ("red-square", "square", "red", "black", "bottom left", None),
    ("blue-triangle", "triangle", "blue", "white", "center", None),
    ("green-circle", "circle", "green", "white", "bottom right", None),
    ("yellow-square", "square", "yellow", "black", "center", None),
    ("red-and-blue", "circle", "red", "white", "top left", ("square", "blue", "bottom right")),
    ("green-and-yellow", "triangle", "green", "black", "top right", ("circle", "yellow", "bottom left")),
    ("blue-and-red", "circle", "blue", "black", "bottom left", ("triangle", "red", "top right")),
    ("yellow-and-green", "square", "yellow", "white", "bottom right", ("square", "green", "top left")),
]


def draw(d: ImageDraw.ImageDraw, shape: str, colour: str, place: str, r: int = 12) -> None:
    x, y = PLACES[place]
    box, fill = (x - r, y - r, x + r, y + r), COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)


def where(place: str) -> str:
    return "in the center" if place == "center" else f"in the {place} corner"


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    for name, shape, colour, bg, place, other in SCENES:
        im = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg])
        d = ImageDraw.Draw(im)
        draw(d, shape, colour, place)
        short = f"a {colour} {shape}"
        dense = f"A {colour} {shape} {where(place)} of a {bg} background"
        if other:
            draw(d, *other)
            short += f" and a {other[1]} {other[0]}"
            dense += f", and a {other[1]} {other[0]} {where(other[2])}"
        im.save(HERE / "images" / f"{name}.png", optimize=True)
        rows.append({"image": f"images/{name}.png", "captions": [
            {"id": f"{name}-1", "kind": "short", "text": short},
            {"id": f"{name}-2", "kind": "dense", "text": dense + "."}]})
    with open(HERE / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} images and {HERE / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
