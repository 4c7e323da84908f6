"""Evaluation benchmarks: a registry of loaders for local copies in their published formats.

A loaded :class:`Benchmark` is a list of images, a flat list of captions with an explicit
caption-to-image index (retrieval), or per-image labels with class names (classification). It
records the sha256 of its annotation files, so two result files say whether they scored the same
data, and every entry it skipped, with the reason. Nothing is downloaded.

Bad input never shifts results silently. A malformed entry or a caption list of the wrong length
is an :class:`InputError` naming the file and the entry. So is a missing image, unless the caller
asks for ``on_missing="skip"``: then the entry is dropped *with its captions* and recorded in
``skipped`` as ``{"where": "<file> entry <i>" or "<file>:<line>", "image": ..., "reason": ...}``.
An image that does not decode is handled the same way when it is encoded
(``encode_benchmark_images(on_bad=...)``).

Formats (``llm2clip.eval.registry.REGISTRY`` lists them, with the files each expects):

* ``flickr30k``, ``coco``: Karpathy test split as Salesforce (BLIP/LAVIS) ships it,
  ``flickr30k_test.json`` / ``coco_karpathy_test.json``: a JSON list of
  ``{"image": "<path relative to the image root>", "caption": ["...", ...]}``.
* ``sharegpt4v``: the first 1,000 entries of ``share-captioner_coco_lcs_sam_1246k_1107.json``:
  ``{"image": relpath, "conversations": [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``.
* ``urban1k``: folders ``image/<i>.jpg`` and ``caption/<i>.txt`` paired by file stem.
* ``docci``: ``docci_descriptions.jsonlines`` (records with ``example_id``, ``split``,
  ``image_file``, ``description``); the ``split == "test"`` records, images in ``images/``.
* ``flickr30k-cn``, ``coco-cn``: the format Chinese-CLIP publishes them in:
  ``<split>_texts.jsonl`` with ``{"text_id": ..., "text": "...", "image_ids": [id]}`` per line,
  and the images either as ``<split>_imgs.tsv`` (``image_id<TAB>base64 image`` per line) or as
  files ``<split>_images/<image_id>.jpg``. Every listed image is a candidate, captioned or not.
* Built in (no files; ``llm2clip.eval.loaders``): ``scenes-short`` / ``scenes-dense`` (held-out
  generated scenes), ``fashion-mnist`` (the Debian package's test split, zero-shot), ``cupl-cra``
  (CRA on the held-out CuPL classes).
* ``imagenet``: a validation folder, either one sub-folder per class (sorted names give the label
  order, as ImageFolder does) or flat images with ``labels.txt`` (``<file name> <integer label>``
  per line, the official ``--imagenet-val-text`` format). Class names: given, or the 1,000
  ImageNet names of clip-benchmark when there are 1,000 classes, else the folder names.

This module gathers the names callers import: the type (``eval.benchmark``), encoding
(``eval.encoding``), one module per loader family (``eval.loaders.*``) and the registry
(``eval.registry``).
"""

from __future__ import annotations

from ..hashing import file_sha256 as sha256_file
from .benchmark import IMAGE_SUFFIXES, ON_MISSING, Benchmark, BenchmarkSpec, BenchmarkUnavailable, TsvImage
from .encoding import encode_benchmark_images, encode_texts
from .loaders.chinese_clip import load_chinese_clip, load_coco_cn, load_flickr30k_cn
from .loaders.cupl_cra import load_cupl_cra
from .loaders.fashion_mnist import ArrayImage, load_fashion_mnist
from .loaders.imagenet import imagenet_classnames, load_imagenet
from .loaders.karpathy import load_coco, load_flickr30k, load_karpathy
from .loaders.long_captions import load_docci, load_sharegpt4v, load_urban1k
from .loaders.scenes import SCENES_COUNT, SCENES_OFFSET, SceneImage, load_scenes, load_scenes_dense, load_scenes_short
from .registry import REGISTRY, describe_benchmarks, load_benchmark, register

__all__ = ["IMAGE_SUFFIXES", "ON_MISSING", "REGISTRY", "SCENES_COUNT", "SCENES_OFFSET", "ArrayImage", "Benchmark",
           "BenchmarkSpec", "BenchmarkUnavailable", "SceneImage", "TsvImage", "describe_benchmarks",
           "encode_benchmark_images", "encode_texts", "imagenet_classnames", "load_benchmark", "load_chinese_clip",
           "load_coco", "load_coco_cn", "load_cupl_cra", "load_docci", "load_fashion_mnist", "load_flickr30k",
           "load_flickr30k_cn", "load_imagenet", "load_karpathy", "load_scenes", "load_scenes_dense",
           "load_scenes_short", "load_sharegpt4v", "load_urban1k", "register", "sha256_file"]
