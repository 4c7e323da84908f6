"""The benchmark registry: every loader, imported here by name, with the files its local copy needs.

``REGISTRY`` maps a name to its :class:`~llm2clip.eval.benchmark.BenchmarkSpec`; ``register`` adds
one (a project's own loader); ``load_benchmark(name, root, **options)`` runs it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import InputError
from ..fileio import markdown_table
from .benchmark import Benchmark, BenchmarkSpec
from .loaders.chinese_clip import load_coco_cn, load_flickr30k_cn
from .loaders.cupl_cra import load_cupl_cra
from .loaders.fashion_mnist import load_fashion_mnist
from .loaders.imagenet import load_imagenet
from .loaders.karpathy import load_coco, load_flickr30k
from .loaders.long_captions import load_docci, load_sharegpt4v, load_urban1k
from .loaders.scenes import load_scenes_dense, load_scenes_short

FILE_BENCHMARKS = (
    BenchmarkSpec("flickr30k", "retrieval", load_flickr30k,
                  "flickr30k_test.json (or annotations/), images at the paths it lists under the root",
                  "Flickr30k 1k Karpathy test, R@1 I2T / T2I"),
    BenchmarkSpec("coco", "retrieval", load_coco,
                  "coco_karpathy_test.json (or annotations/), images (val2014/...) under the root",
                  "COCO 5k Karpathy test, R@1 I2T / T2I"),
    BenchmarkSpec("sharegpt4v", "retrieval", load_sharegpt4v,
                  "share-captioner_coco_lcs_sam_1246k_1107.json, images at the paths it lists under the root",
                  "first 1k of Share-Captioner, R@1 I2T / T2I"),
    BenchmarkSpec("urban1k", "retrieval", load_urban1k, "image/<i>.jpg and caption/<i>.txt",
                  "Urban-1k, R@1 I2T / T2I"),
    BenchmarkSpec("docci", "retrieval", load_docci, "docci_descriptions.jsonlines and images/",
                  "DOCCI test split, R@1 I2T / T2I"),
    BenchmarkSpec("flickr30k-cn", "retrieval", load_flickr30k_cn,
                  "test_texts.jsonl and test_imgs.tsv (or test_images/<id>.jpg)", "Flickr30k-CN, R@1 I2T / T2I"),
    BenchmarkSpec("coco-cn", "retrieval", load_coco_cn,
                  "test_texts.jsonl and test_imgs.tsv (or test_images/<id>.jpg)", "COCO-CN, R@1 I2T / T2I"),
    BenchmarkSpec("imagenet", "classification", load_imagenet,
                  "class sub-folders of images, or images + labels.txt ('<file> <label>')",
                  "ImageNet-1k val, zero-shot top-1 / top-5"),
)
BUILTIN_BENCHMARKS = (
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
)

REGISTRY: dict[str, BenchmarkSpec] = {s.name: s for s in FILE_BENCHMARKS + BUILTIN_BENCHMARKS}


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add (or replace) a benchmark in ``REGISTRY``."""
    REGISTRY[spec.name] = spec
    return spec


def _takes_root(loader) -> bool:
    return "root" in inspect.signature(loader).parameters


def load_benchmark(name: str, root: str | Path | None = None, **options) -> Benchmark:
    """Load benchmark ``name`` from its local copy at ``root`` (built-in sets need none); options go
    to its loader."""
    spec = REGISTRY.get(name.lower())
    if spec is None:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(REGISTRY))}")
    if root is None and not spec.builtin:
        raise InputError(f"benchmark {spec.name} needs its local copy: {spec.name}=DIR with {spec.expects}")
    if root is not None and spec.builtin and not _takes_root(spec.loader):
        raise InputError(f"benchmark {spec.name} is built in and takes no folder (got {root})")
    args = (root,) if root is not None and not spec.builtin else ()
    if root is not None and spec.builtin:
        options = {**options, "root": root}
    try:
        inspect.signature(spec.loader).bind(*args, **options)
    except TypeError as err:
        raise InputError(f"benchmark {spec.name}: {err}") from None
    return spec.loader(*args, **options)


def describe_benchmarks() -> str:
    """A Markdown table of the registry: name, task, expected files, what the paper reports."""
    return markdown_table(["benchmark", "task", "expected files", "paper"],
                          [(s.name, s.task, s.expects, s.paper) for s in REGISTRY.values()])
