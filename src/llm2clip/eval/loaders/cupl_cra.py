"""Built in: caption retrieval accuracy on the 200 held-out CuPL classes x 5 descriptions, through the
model's own text path."""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import Benchmark
from .common import digest_texts


def load_cupl_cra(split: str = "heldout", classes: int = 200, per_class: int = 5,
                  mask_class_names: bool = False) -> Benchmark:
    """``per_class`` CuPL descriptions of each of ``classes`` classes; a hit shares the class."""
    from ...assets import clip_benchmark_file
    from ...data.captions import cupl_caption_set

    if classes < 2 or per_class < 2:
        raise InputError(f"cupl-cra: need at least 2 classes and 2 descriptions per class "
                         f"(got {classes} x {per_class})")
    cs = cupl_caption_set(split, classes, per_class, mask_class_names)
    src = clip_benchmark_file("cupl_prompts.json")
    return Benchmark("cupl-cra", "cra", [], cs.captions, np.zeros(0, dtype=np.int64), groups=cs.groups,
                     root=str(src.parent), files={src.name: sha256_file(src), "captions": digest_texts(cs.captions)},
                     meta={"format": "cupl-caption-set", "caption_set": cs.name, **cs.meta})
