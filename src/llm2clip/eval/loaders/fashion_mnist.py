"""Built in: zero-shot top-1 / top-5 on the test split of the Debian package ``dataset-fashion-mnist``
(or a folder of its idx .gz files); class weights from CLIP-style templates and from CuPL descriptions
of the matching ImageNet classes. Absent files at the default place are a BenchmarkUnavailable
(skipped by ``llm2clip eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import Benchmark, BenchmarkUnavailable
from ..prompts import fashion_prompt_sets


@dataclass(frozen=True, eq=False)
class ArrayImage:
    """Row ``index`` of a uint8 [N, H, W] array, as a greyscale PIL image."""

    array: np.ndarray = field(repr=False)
    index: int
    label: str = "array"

    def __str__(self) -> str:
        return f"{self.label}[{self.index}]"

    def load_image(self):
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(self.array[self.index]))  # uint8 [H, W]: mode L


def load_fashion_mnist(root: str | Path | None = None, split: str = "test", count: int | None = None,
                       prompts: str = "both", cupl_per_class: int = 50) -> Benchmark:
    """Fashion-MNIST ``split`` (the first ``count`` images) as a zero-shot benchmark."""
    from ...data import fashion_mnist as fm

    folder = Path(root).expanduser() if root is not None else Path(fm.DEFAULT_DIR)
    if split not in fm.FILES:
        raise InputError(f"fashion-mnist: split must be train or test, got {split!r}")
    missing = [f for f in fm.FILES[split] if not (folder / f).is_file()]
    if missing:
        msg = f"fashion-mnist: {folder / missing[0]} not found"
        if root is None:  # the default location: not installed, so the set is skipped
            raise BenchmarkUnavailable(f"{msg} (apt-get install dataset-fashion-mnist, set LLM2CLIP_FASHION_MNIST, "
                                       f"or give fashion-mnist=DIR)")
        raise InputError(msg)
    if count is not None and count < 1:
        raise InputError(f"fashion-mnist: count must be >= 1, got {count}")
    img_file, lab_file = fm.FILES[split]
    images, labels = fm.read_idx(folder / img_file), fm.read_idx(folder / lab_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"fashion-mnist: {folder / img_file} holds {images.shape}, {folder / lab_file} "
                         f"{labels.shape}; expected [N, 28, 28] images and N labels")
    n = len(images) if count is None else min(count, len(images))
    sets, info = fashion_prompt_sets(prompts, cupl_per_class)
    files = {f: sha256_file(folder / f) for f in fm.FILES[split]}
    src = f"fashion-mnist/{split}"
    return Benchmark("fashion-mnist", "classification", [ArrayImage(images, i, src) for i in range(n)],
                     labels=labels[:n], classnames=list(fm.CLASSES), root=str(folder), files=files, prompts=sets,
                     meta={"format": "idx-gz", "split": split, "count": n, "prompt_sets_info": info})
