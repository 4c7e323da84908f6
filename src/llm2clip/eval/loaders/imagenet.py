"""ImageNet val for zero-shot classification: one sub-folder per class (sorted names give the label
order, as ImageFolder does), or flat images with ``labels.txt`` (``<file name> <integer label>``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import IMAGE_SUFFIXES, Benchmark
from .common import check_on_missing, digest_of, missing_message, require_dir


def _load_classnames(classnames) -> tuple[list[str], str]:
    """A list, a .json (a list, or clip-benchmark's {"imagenet1k": [...]}) or a one-name-per-line file."""
    if not isinstance(classnames, (str, Path)):
        return [str(c) for c in classnames], "given"
    p = Path(classnames)
    if not p.is_file():
        raise InputError(f"{p}: class-name file not found")
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        return list(data["imagenet1k"] if isinstance(data, dict) else data), str(p)
    return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()], str(p)


def imagenet_classnames() -> list[str]:
    from ...assets import clip_benchmark_file

    return json.loads(clip_benchmark_file("en_classnames.json").read_text(encoding="utf-8"))["imagenet1k"]


def load_imagenet(root, classnames=None, labels_file: str = "labels.txt", on_missing="error") -> Benchmark:
    """ImageNet val: class sub-folders (sorted = label order) or flat images + labels_file."""
    check_on_missing(on_missing)
    root = require_dir(root, "imagenet")
    lab_path = root / labels_file
    files, skipped = {}, []
    if lab_path.is_file():
        images, labels, missing = [], [], []
        for ln, line in enumerate(lab_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise InputError(f"{lab_path}:{ln}: expected '<file name> <integer label>'")
            p = root / parts[0]
            if not p.is_file():
                missing.append((f"{lab_path.name}:{ln}", parts[0]))
                continue
            images.append(str(p))
            labels.append(int(parts[1]))
        if missing:
            if on_missing == "error":
                raise InputError(missing_message("imagenet", str(lab_path), missing))
            skipped = [{"where": w, "image": p, "reason": "image file missing"} for w, p in missing]
        if not labels:
            raise InputError(f"{lab_path}: no usable lines")
        n_classes, folder_names = max(labels) + 1, None
        files[lab_path.name] = sha256_file(lab_path)
        fmt = "flat+labels"
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir())
        if not dirs:
            raise InputError(f"{root}: neither class sub-folders nor {labels_file}")
        images, labels = [], []
        for c, d in enumerate(dirs):
            files_c = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images += [str(p) for p in files_c]
            labels += [c] * len(files_c)
        if not images:
            raise InputError(f"{root}: the class folders hold no images")
        n_classes, folder_names = len(dirs), [d.name for d in dirs]
        fmt = "class-folders"
    if classnames is not None:
        names, src = _load_classnames(classnames)
    elif n_classes == 1000:
        names, src = imagenet_classnames(), "clip_benchmark:en_classnames.json#imagenet1k"
    elif folder_names is not None:
        names, src = [re.sub(r"_+", " ", s) for s in folder_names], "folder names"
    else:
        raise InputError(f"imagenet: {n_classes} classes; pass class names (a list, a .json or a text file)")
    if folder_names is not None and len(names) != len(folder_names):
        raise InputError(f"imagenet: {len(names)} class names ({src}) for {len(folder_names)} class folders")
    if max(labels) >= len(names) or min(labels) < 0:
        raise InputError(f"imagenet: labels range {min(labels)}..{max(labels)} but {len(names)} class names ({src})")
    rel = [(str(Path(p).relative_to(root)), str(lab)) for p, lab in zip(images, labels, strict=True)]
    files["listing"] = digest_of(rel)
    return Benchmark("imagenet", "classification", images, labels=np.asarray(labels), classnames=names,
                     root=str(root), files=files, skipped=skipped,
                     meta={"format": fmt, "classnames_source": src})
