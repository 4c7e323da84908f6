"""Caption sets: captions with a group id (captions of one image or one subject share a group).

Built in: the CuPL descriptions of 998 ImageNet classes (clip-benchmark's package data), split
by a fixed seeded permutation of classes into train and held-out; optionally with the class
name masked in every sentence. From files: an image manifest, the captions of each image one group
(the older JSONL of {"group": ..., "caption": ...} still reads, with a deprecation warning).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import clip_benchmark_file
from ..errors import InputError
from .jsonl import is_manifest, read_jsonl, read_manifest, warn_old_shape

CUPL_SPLIT_SEED = 0
CUPL_HELDOUT_CLASSES = 200  # the held-out classes are fixed; train uses the other 798
MASK_WORD = "X"


@dataclass
class CaptionSet:
    name: str
    captions: list[str]
    groups: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def cupl_descriptions() -> dict[str, list[str]]:
    path = clip_benchmark_file("cupl_prompts.json")
    return json.loads(path.read_text(encoding="utf-8"))["imagenet1k"]


def cupl_split(seed: int = CUPL_SPLIT_SEED, heldout: int = CUPL_HELDOUT_CLASSES) -> tuple[list[str], list[str]]:
    """(train classes, held-out classes): a fixed permutation, so every run scores the same classes."""
    classes = sorted(cupl_descriptions())
    random.Random(seed).shuffle(classes)
    return classes[heldout:], classes[:heldout]


def mask_class_name(sentence: str, classname: str) -> str:
    """Replace the class name, and its head noun (last word), singular or plural, by 'X'."""
    names = {classname.strip()}
    words = classname.strip().split()
    if len(words) > 1 and len(words[-1]) >= 3:
        names.add(words[-1])
    for name in sorted(names, key=len, reverse=True):
        pattern = r"\b" + re.escape(name) + r"(?:es|s)?\b"
        sentence = re.sub(pattern, MASK_WORD, sentence, flags=re.IGNORECASE)
    return sentence


def cupl_caption_set(split: str = "heldout", n_classes: int | None = 200, per_class: int = 5,
                     mask_class_names: bool = False, seed: int = 0) -> CaptionSet:
    """``per_class`` descriptions of each of the first ``n_classes`` classes of a split."""
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
    desc = cupl_descriptions()
    train, held = cupl_split()
    classes = held if split == "heldout" else train
    classes = classes[:n_classes] if n_classes else classes
    rng = random.Random(seed)
    captions, groups = [], []
    for c in classes:
        sents = list(dict.fromkeys(s.strip() for s in desc[c] if s.strip()))
        rng.shuffle(sents)
        for s in sents[:per_class]:
            captions.append(mask_class_name(s, c) if mask_class_names else s)
            groups.append(c)
    name = f"cupl-{split}-{len(classes)}x{per_class}" + ("-masked" if mask_class_names else "")
    return CaptionSet(name, captions, groups, {"split": split, "classes": len(classes), "per_class": per_class,
                                               "mask_class_names": mask_class_names, "seed": seed})


def load_caption_file(path: str | Path) -> CaptionSet:
    """An image manifest (``llm2clip.data.jsonl.read_manifest``, JSONL or CSV): the captions of one image form
    one group. Still read, with a deprecation warning: JSONL of {"group": ..., "caption": "..."} lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: caption file not found")
    if is_manifest(path):
        caps = list(read_manifest(path, need_text=True))
        captions, groups = [c.text for c in caps], [c.image for c in caps]
    else:
        warn_old_shape(path, '{"group": ..., "caption": ...}')
        captions, groups = _old_caption_lines(path)
    if not captions:
        raise InputError(f"{path}: no captions")
    return CaptionSet(path.stem, captions, groups, {"file": str(path)})


load_caption_jsonl = load_caption_file  # the earlier name


def _old_caption_lines(path: Path) -> tuple[list[str], list[str]]:
    captions, groups = [], []
    for ln, rec in read_jsonl(path):
        for key in ("group", "caption"):
            if key not in rec:
                raise InputError(f"{path}:{ln}: missing field '{key}'")
        cap = rec["caption"]
        if not isinstance(cap, str) or not cap.strip():
            raise InputError(f"{path}:{ln}: field 'caption' must be a non-empty string")
        if not isinstance(rec["group"], (str, int)):
            raise InputError(f"{path}:{ln}: field 'group' must be a string or an integer")
        captions.append(cap.strip())
        groups.append(str(rec["group"]))
    return captions, groups


def caption_set_from_name(name: str, mask_class_names: bool = False, n_classes: int | None = 200,
                          per_class: int = 5) -> CaptionSet:
    """'cupl-heldout', 'cupl-train', or a caption file (an image manifest)."""
    if name in ("cupl-heldout", "cupl-train"):
        return cupl_caption_set(name.split("-")[1], n_classes, per_class, mask_class_names)
    return load_caption_file(name)
