"""Generated scenes: small images of shapes, each with a short and a dense caption.

A scene has 2-5 objects in distinct cells of a 3x3 grid, each with a shape, a colour and a size,
on a coloured background. The short caption is one clause about one object (or the count); the
dense caption names every object with its attributes and position, the counts, and pairwise
relations (40 to 150 words). Telling scenes apart by their dense caption needs attribute binding
(which colour goes with which shape), counts and positions, and dense captions often run past
the 77 tokens of a CLIP text encoder: the case LLM2CLIP is about, at CPU scale.

Everything is a pure function of (seed, index): scene ``i`` is the same in every process, run
and resume, and images are rendered on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (110, 110, 110), "brown": (100, 70, 40), "navy": (20, 25, 70)}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_DENSE_WORDS, MAX_DENSE_WORDS = 40, 150


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float  # jitter of the centre within its cell, in cell units
    dy: float

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def place(self) -> str:
        r, c = ROWS[self.row], COLS[self.col]
        if r == "middle" and c == "center":
            return "the center"
        if r == "middle":
            return f"the middle {c}"
        if c == "center":
            return f"the {r} center"
        return f"the {r} {c}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    vert = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horiz = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    if vert and horiz:
        return f"{vert} and {horiz}"
    return vert or horiz


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    background: str
    objects: tuple[SceneObject, ...]
    short_style: int

    @property
    def key(self) -> str:
        return f"scene{self.seed}-{self.index}"

    # -------------------------------------------------------------------------------- captions
    def short_caption(self) -> str:
        o = self.objects[0]
        n = NUMBERS[len(self.objects)]
        return (f"a {o.colour} {o.shape} on a {self.background} background",
                f"a {o.size} {o.colour} {o.shape} among other shapes",
                f"{n} shapes on a {self.background} background")[self.short_style]

    def dense_caption(self) -> str:
        objs = self.objects
        n = len(objs)
        parts = [f"This image shows {NUMBERS[n]} shapes on a plain {self.background} background."]
        for o in objs:
            parts.append(f"In {o.place} there is a {o.name}.")
        counts: dict[str, int] = {}
        for o in objs:
            counts[o.colour] = counts.get(o.colour, 0) + 1
        listed = [f"{NUMBERS[k]} {c}" for c, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        parts.append("By colour there " + ("is " if counts[min(counts)] == 1 and len(listed) == 1 else "are ")
                     + (", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]) + " shape"
                     + ("s" if n > 1 else "") + ".")
        large = sum(o.size == "large" for o in objs)
        if large in (0, n):
            parts.append(f"All {NUMBERS[n]} of them are {'large' if large else 'small'}.")
        else:
            parts.append(f"{NUMBERS[large].capitalize()} of them {'is' if large == 1 else 'are'} large and "
                         f"{NUMBERS[n - large]} {'is' if n - large == 1 else 'are'} small.")
        words = sum(len(p.split()) for p in parts)
        for i in range(n):
            for j in range(i + 1, n):
                a, b = objs[i], objs[j]
                s = f"The {a.colour} {a.shape} is {_relation(a, b)} the {b.colour} {b.shape}."
                if words + len(s.split()) > MAX_DENSE_WORDS:
                    break
                parts.append(s)
                words += len(s.split())
        filler = ["Each shape is drawn flat, with sharp edges and no shadow.",
                  "No two shapes overlap, and each sits in its own cell of a three by three grid.",
                  "The remaining cells of the grid are empty."]
        for f in filler:  # short scenes still reach the dense-caption minimum
            if words >= MIN_DENSE_WORDS:
                break
            parts.append(f)
            words += len(f.split())
        return " ".join(parts)

    def captions(self) -> dict[str, str]:
        return {"short": self.short_caption(), "dense": self.dense_caption()}

    # -------------------------------------------------------------------------------- pixels
    def render(self, size: int = 64) -> Image.Image:
        scale = 4  # draw large, downsample: anti-aliased edges at small sizes
        S = size * scale
        im = Image.new("RGB", (S, S), BACKGROUNDS[self.background])
        d = ImageDraw.Draw(im)
        cell = S / 3
        for o in self.objects:
            cx, cy = (o.col + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell
            r = cell * (0.42 if o.size == "large" else 0.22)
            fill = COLOURS[o.colour]
            if o.shape == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif o.shape == "square":
                q = r * 0.85
                d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
            elif o.shape == "triangle":
                d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
            elif o.shape == "diamond":
                d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
            else:  # cross
                w = r * 0.35
                d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
                d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        return im.resize((size, size), Image.Resampling.BOX)


@lru_cache(maxsize=4096)
def make_scene(seed: int, index: int, min_objects: int = 2, max_objects: int = 5) -> Scene:
    rng = np.random.default_rng([seed, index, 0x5CE7E])
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    colours, shapes = list(COLOURS), list(SHAPES)
    objs = []
    for c in cells:
        size = SIZES[int(rng.integers(2))]
        jit = 0.0 if size == "large" else 0.12  # small shapes wander a little inside their cell
        objs.append(SceneObject(shapes[int(rng.integers(len(shapes)))], colours[int(rng.integers(len(colours)))],
                                size, int(c) // 3, int(c) % 3, float(rng.uniform(-jit, jit)),
                                float(rng.uniform(-jit, jit))))
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(seed, index, bg, tuple(objs), int(rng.integers(3)))


class SceneSet:
    """Scenes ``offset .. offset+count-1`` of generator ``seed``; held-out sets use another offset."""

    def __init__(self, count: int, seed: int = 0, offset: int = 0, min_objects: int = 2, max_objects: int = 5,
                 render_size: int = 64):
        if not 1 <= min_objects <= max_objects <= 9:
            raise ValueError("need 1 <= min_objects <= max_objects <= 9 (a 3x3 grid)")
        self.count, self.seed, self.offset = count, seed, offset
        self.min_objects, self.max_objects, self.render_size = min_objects, max_objects, render_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return make_scene(self.seed, self.offset + i, self.min_objects, self.max_objects)

    def image(self, i: int) -> Image.Image:
        return self[i].render(self.render_size)

    def caption_id(self, i: int, kind: str) -> str:
        return f"{self[i].key}-{kind}"

    def captions(self) -> dict[str, str]:
        """Every caption by id: what a caption encoder embeds into the feature store."""
        out = {}
        for i in range(self.count):
            for kind, text in self[i].captions().items():
                out[self.caption_id(i, kind)] = text
        return out
