"""Draws docs/method.png, the picture of the method in the README: `python docs/method_diagram.py`."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

BOXES = {  # name: (x, y, w, h, title, body, colour)
    "llm": (0.2, 5.2, 3.0, 1.6, "Decoder LLM",
            "SmolLM2 / Llama-3\nbidirectional or causal mask\nmean pooling, template", "#dbe9f6"),
    "stage1": (4.2, 5.2, 3.6, 1.6, "Stage 1: LoRA fine-tuning",
               "MNTP, then caption contrast\n(supervised SimCSE: captions of\nthe same image close)", "#fde2c8"),
    "cra": (8.8, 5.2, 2.9, 1.6, "CRA", "caption retrieval accuracy\non held-out captions", "#eeeeee"),
    "store": (4.2, 2.6, 3.6, 1.6, "Caption-embedding store",
              "frozen caption encoder runs once:\nsharded vectors + manifest\n(identity, checksums)", "#e2f0d9"),
    "stage2": (0.2, 0.0, 5.0, 1.6, "Stage 2: CLIP loss",
               "vision tower (trained)  <->  adapter over the\nstored vectors (trained); short + dense captions",
               "#f6dbe9"),
    "use": (6.4, 0.0, 5.3, 1.6, "Evaluate and use",
            "image-text retrieval, zero-shot, CRA\nload / encode / search / serve / export", "#eeeeee"),
}
ARROWS = [("llm", "stage1"), ("stage1", "cra"), ("stage1", "store"), ("store", "stage2"), ("stage2", "use")]


def _anchor(box, side):
    x, y, w, h = BOXES[box][:4]
    return {"r": (x + w, y + h / 2), "l": (x, y + h / 2), "b": (x + w / 2, y), "t": (x + w / 2, y + h)}[side]


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 6.4))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.3, 7.2)
    ax.axis("off")
    for x, y, w, h, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05,rounding_size=0.15", fc=colour, ec="#444"))
        ax.text(x + w / 2, y + h - 0.3, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.2, body, ha="center", va="center", fontsize=9)
    sides = {("llm", "stage1"): ("r", "l"), ("stage1", "cra"): ("r", "l"), ("stage1", "store"): ("b", "t"),
             ("store", "stage2"): ("b", "t"), ("stage2", "use"): ("r", "l")}
    for a, b in ARROWS:
        sa, sb = sides[(a, b)]
        ax.add_patch(FancyArrowPatch(_anchor(a, sa), _anchor(b, sb), arrowstyle="-|>", mutation_scale=16, lw=1.4,
                                     color="#333", connectionstyle="arc3,rad=0.0"))
    ax.text(6.0, 7.0, "LLM2CLIP: a decoder LLM fine-tuned into a caption encoder becomes CLIP's text teacher",
            ha="center", fontsize=12)
    ax.text(8.1, 3.4, "the LLM never runs in stage 2:\na step costs little more than\nthe vision tower", fontsize=9,
            style="italic", color="#555")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(__file__).with_name("method.png"))
