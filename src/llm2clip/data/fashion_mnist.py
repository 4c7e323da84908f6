"""Fashion-MNIST (Debian package dataset-fashion-mnist) as image-caption records.

Captions are class-level: a short one ("a photo of a sneaker") and dense ones taken from the
CuPL descriptions of the matching ImageNet class (docs/ASSETS.md), several per class. Retrieval on it is
therefore class-level. ``available()`` is false when the files are absent; callers skip cleanly.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from .images import Caption, Record

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _default_dir() -> Path:
    """$LLM2CLIP_FASHION_MNIST, else the Debian package's folder, else the copy scripts/setup.sh unpacks into the
    environment (share/datasets/fashion-mnist) when it cannot install the package as root."""
    if os.environ.get("LLM2CLIP_FASHION_MNIST"):
        return Path(os.environ["LLM2CLIP_FASHION_MNIST"])
    system = Path("/usr/share/datasets/fashion-mnist")
    local = Path(sys.prefix) / "share" / "datasets" / "fashion-mnist"
    return local if not (system / FILES["test"][0]).is_file() and (local / FILES["test"][0]).is_file() else system


DEFAULT_DIR = _default_dir()
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Fashion-MNIST class -> CuPL (ImageNet) class names whose descriptions stand in for dense captions.
CUPL_CLASSES = {"T-shirt/top": ["T-shirt"], "trouser": ["jeans"], "pullover": ["sweatshirt"], "dress": ["gown"],
                "coat": ["trench coat"], "sandal": ["sandal"], "shirt": [], "sneaker": ["sneaker"],
                "bag": ["purse", "backpack"], "ankle boot": ["cowboy boot"]}


def available(root: str | Path = DEFAULT_DIR) -> bool:
    return all((Path(root) / f).is_file() for pair in FILES.values() for f in pair)


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzipped or not): big-endian magic (0, 0, dtype 0x08=uint8, ndim), then the dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path}: not a uint8 idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {body.size}")
    return body.reshape(dims)


def load(split: str = "train", root: str | Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    if split not in FILES:
        raise InputError(f"fashion-mnist split must be train or test, got {split!r}")
    if not available(root):
        raise InputError(f"{root}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist)")
    img, lab = FILES[split]
    return read_idx(Path(root) / img), read_idx(Path(root) / lab)


def class_captions(per_class: int = 20, seed: int = 0) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """class -> kind -> [(caption id, text)]; dense captions come from CuPL when clip-benchmark is installed."""
    import random

    try:
        from .captions import cupl_descriptions

        cupl = cupl_descriptions()
    except Exception:
        cupl = {}
    out = {}
    for c, names in CUPL_CLASSES.items():
        slug = c.replace("/", "-").replace(" ", "-")
        kinds = {"short": [(f"fmnist-{slug}-short", f"a photo of a {c}")]}
        sents = [s.strip() for n in names for s in cupl.get(n, []) if s.strip()]
        random.Random(seed).shuffle(sents)
        if sents:
            kinds["dense"] = [(f"fmnist-{slug}-dense-{i}", s) for i, s in enumerate(sents[:per_class])]
        out[c] = kinds
    return out


class FashionMnist:
    """Records plus an image loader (index -> PIL) for the first ``count`` images of a split."""

    def __init__(self, split: str = "train", count: int | None = None, root: str | Path = DEFAULT_DIR,
                 per_class: int = 20, seed: int = 0):
        images, labels = load(split, root)
        n = len(images) if count is None else min(count, len(images))
        self.images, self.labels = images[:n], labels[:n]
        caps = class_captions(per_class, seed)
        self.records = []
        for i, y in enumerate(self.labels):
            kinds = caps[CLASSES[int(y)]]
            self.records.append(Record(i, {k: [Caption(cid, t) for cid, t in v] for k, v in kinds.items()}))

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], mode="L")
