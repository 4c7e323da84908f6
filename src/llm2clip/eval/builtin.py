"""Built-in evaluation sets that need no files: they run on any CPU, in tests and in the quickstart.

* ``scenes-short`` / ``scenes-dense``: held-out generated scenes (llm2clip.data.scenes, far from
  any training offset), one caption of that kind per image; retrieval in both directions.
* ``fashion-mnist``: zero-shot top-1 / top-5 on the test split of the Debian package
  ``dataset-fashion-mnist``; class weights from CLIP-style templates and from CuPL descriptions of
  the matching ImageNet classes. Absent files are a :class:`BenchmarkUnavailable` (skipped by
  ``llm2clip eval``) unless a folder was named.
* ``cupl-cra``: caption retrieval accuracy on the 200 held-out CuPL classes x 5 descriptions,
  through the model's own text path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .benchmarks import Benchmark, BenchmarkSpec, BenchmarkUnavailable, register, sha256_file

SCENES_OFFSET = 1_000_000  # training sets start at 0; this range is held out
SCENES_COUNT = 500
# Fashion-MNIST has no CLIP template set; these are CLIP ImageNet templates that fit small grey
# product photos, plus the short caption the fashion_mnist training source uses.
FASHION_TEMPLATES = ("a photo of a {c}", "a photo of a {c}.", "a photo of the {c}.",
                     "a black and white photo of a {c}.", "a low resolution photo of a {c}.",
                     "a blurry photo of a {c}.", "a photo of a small {c}.")
PROMPT_CHOICES = ("both", "templates", "cupl")


def _digest(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneImage:
    """A generated scene, rendered when loaded (picklable for DataLoader workers)."""

    seed: int
    index: int
    size: int
    min_objects: int = 2
    max_objects: int = 5

    def __str__(self) -> str:
        return f"scene{self.seed}-{self.index}@{self.size}px"

    def load_image(self):
        from ..data.scenes import make_scene

        return make_scene(self.seed, self.index, self.min_objects, self.max_objects).render(self.size)


def load_scenes(kind: str = "dense", count: int = SCENES_COUNT, seed: int = 0, offset: int = SCENES_OFFSET,
                render_size: int = 64, min_objects: int = 2, max_objects: int = 5) -> Benchmark:
    """Scenes ``offset .. offset+count-1`` of generator ``seed``, each with its ``kind`` caption."""
    from ..data.scenes import SceneSet

    if kind not in ("short", "dense"):
        raise InputError(f"scenes: caption kind must be short or dense, got {kind!r}")
    if count < 2 or render_size < 8 or offset < 0:
        raise InputError(f"scenes: need count >= 2, render_size >= 8, offset >= 0 (got {count}, {render_size}, "
                         f"{offset})")
    try:
        scenes = SceneSet(count, seed, offset, min_objects, max_objects, render_size)
    except ValueError as err:
        raise InputError(f"scenes: {err}") from None
    images, captions = [], []
    for i in range(count):
        images.append(SceneImage(seed, offset + i, render_size, min_objects, max_objects))
        captions.append(scenes[i].captions()[kind])
    name = f"scenes-{kind}"
    return Benchmark(name, "retrieval", images, captions, np.arange(count), root="(generated)",
                     files={"generated captions": _digest(captions)},
                     meta={"format": "generated-scenes", "caption_kind": kind, "seed": seed, "offset": offset,
                           "count": count, "render_size": render_size, "objects": [min_objects, max_objects]})


def load_scenes_short(**kw) -> Benchmark:
    return load_scenes("short", **kw)


def load_scenes_dense(**kw) -> Benchmark:
    return load_scenes("dense", **kw)


# -------------------------------------------------------------------------------- fashion-mnist
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


def fashion_prompt_sets(prompts: str = "both", per_class: int = 50, seed: int = 0) -> tuple[dict, dict]:
    """Prompt sets for the 10 classes (label -> prompts) and what they are made of.

    'templates': FASHION_TEMPLATES; 'cupl': up to ``per_class`` CuPL descriptions of the matching
    ImageNet classes (data.fashion_mnist.CUPL_CLASSES), templates for a class with none (shirt);
    'both': templates first (the table's column), then CuPL."""
    import random

    from ..data import fashion_mnist as fm
    from .zeroshot import descriptions_or_templates

    if prompts not in PROMPT_CHOICES:
        raise InputError(f"fashion-mnist: prompts must be one of {', '.join(PROMPT_CHOICES)}, got {prompts!r}")
    sets, info = {}, {}
    if prompts in ("templates", "both"):
        sets["templates"] = list(FASHION_TEMPLATES)
        info["templates"] = {"count": len(FASHION_TEMPLATES)}
    if prompts in ("cupl", "both"):
        from ..data.captions import cupl_descriptions

        cupl = cupl_descriptions()
        desc = {}
        for c, names in fm.CUPL_CLASSES.items():
            sents = list(dict.fromkeys(s.strip() for n in names for s in cupl.get(n, []) if s.strip()))
            random.Random(seed).shuffle(sents)
            desc[c] = sents[:per_class]
        sets["cupl"], fallback = descriptions_or_templates(fm.CLASSES, desc, FASHION_TEMPLATES)
        info["cupl"] = {"per_class": per_class, "seed": seed, "cupl_classes": fm.CUPL_CLASSES,
                        "template_fallback": fallback}
    return sets, info


def load_fashion_mnist(root: str | Path | None = None, split: str = "test", count: int | None = None,
                       prompts: str = "both", cupl_per_class: int = 50) -> Benchmark:
    """Fashion-MNIST ``split`` (the first ``count`` images) as a zero-shot benchmark."""
    from ..data import fashion_mnist as fm

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


# ------------------------------------------------------------------------------------- CuPL CRA
def load_cupl_cra(split: str = "heldout", classes: int = 200, per_class: int = 5,
                  mask_class_names: bool = False) -> Benchmark:
    """``per_class`` CuPL descriptions of each of ``classes`` classes; a hit shares the class."""
    from ..assets import clip_benchmark_file
    from ..data.captions import cupl_caption_set

    if classes < 2 or per_class < 2:
        raise InputError(f"cupl-cra: need at least 2 classes and 2 descriptions per class "
                         f"(got {classes} x {per_class})")
    cs = cupl_caption_set(split, classes, per_class, mask_class_names)
    src = clip_benchmark_file("cupl_prompts.json")
    return Benchmark("cupl-cra", "cra", [], cs.captions, np.zeros(0, dtype=np.int64), groups=cs.groups,
                     root=str(src.parent), files={src.name: sha256_file(src), "captions": _digest(cs.captions)},
                     meta={"format": "cupl-caption-set", "caption_set": cs.name, **cs.meta})


for _spec in (
    BenchmarkSpec("scenes-short", "retrieval", load_scenes_short,
                  "built in: 500 held-out generated scenes (offset 1,000,000), one short caption each",
                  "R@1 I2T / T2I; the short-caption case at CPU scale", builtin=True),
    BenchmarkSpec("scenes-dense", "retrieval", load_scenes_dense,
                  "built in: 500 held-out generated scenes (offset 1,000,000), one dense caption each",
                  "R@1 I2T / T2I; the long-caption case at CPU scale", builtin=True),
    BenchmarkSpec("fashion-mnist", "classification", load_fashion_mnist,
                  "built in: the Debian package dataset-fashion-mnist (or fashion-mnist=DIR with its idx .gz files)",
                  "zero-shot top-1 / top-5", builtin=True),
    BenchmarkSpec("cupl-cra", "cra", load_cupl_cra,
                  "built in: clip-benchmark's CuPL descriptions, 200 held-out classes x 5",
                  "CRA R@1 with its pool size", builtin=True),
):
    register(_spec)
