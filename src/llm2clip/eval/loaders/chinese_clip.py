"""Flickr30k-CN and COCO-CN in the layout Chinese-CLIP publishes: ``<split>_texts.jsonl`` with
``{"text_id", "text", "image_ids": [id]}`` per line, and the images as ``<split>_imgs.tsv``
(``image_id<TAB>base64 image``) or as files ``<split>_images/<image_id>.jpg``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...data.jsonl import read_jsonl
from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import IMAGE_SUFFIXES, Benchmark, TsvImage
from .common import MAX_LISTED, caption_text, check_on_missing, digest_of, find_file, require_dir, stem_key


def _tsv_index(path: Path) -> dict[str, TsvImage]:
    out, off = {}, 0
    with open(path, "rb") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                key, sep, _ = line.partition(b"\t")
                if not sep:
                    raise InputError(f"{path}:{ln}: expected 'image_id<TAB>base64 image'")
                out[key.decode().strip()] = TsvImage(str(path), off, key.decode().strip())
            off += len(line)
    return out


def load_chinese_clip(root, name: str, split: str = "test", on_missing="error") -> Benchmark:
    """Chinese-CLIP layout: <split>_texts.jsonl and <split>_imgs.tsv (or <split>_images/<id>.jpg)."""
    check_on_missing(on_missing)
    root = require_dir(root, name)
    ann = find_file(root, f"{split}_texts.jsonl")
    tsv, folder = root / f"{split}_imgs.tsv", root / f"{split}_images"
    files = {ann.name: sha256_file(ann)}
    if tsv.is_file():
        refs: dict = _tsv_index(tsv)
        files[tsv.name] = sha256_file(tsv)
        fmt = "chinese-clip-tsv"
    elif folder.is_dir():
        refs = {p.stem: str(p) for p in sorted(folder.iterdir(), key=lambda p: stem_key(p.stem))
                if p.suffix.lower() in IMAGE_SUFFIXES}
        files[f"{folder.name}/"] = digest_of([(k, Path(v).name) for k, v in refs.items()])
        fmt = "chinese-clip-folder"
    else:
        raise InputError(f"{name}: neither {tsv} nor {folder}/ exists")
    order = {k: i for i, k in enumerate(refs)}
    captions, index, missing, skipped = [], [], [], []
    for ln, rec in read_jsonl(ann):
        if "text" not in rec or not isinstance(rec.get("image_ids"), list):
            raise InputError(f"{ann}:{ln}: expected an object with 'text' and 'image_ids'")
        ids = [str(i) for i in rec["image_ids"]]
        if len(ids) != 1:  # one caption, one image: a text of several images has no single T2I target
            raise InputError(f"{ann}:{ln} (text_id {rec.get('text_id')}): {len(ids)} image_ids, expected 1")
        if ids[0] not in order:
            missing.append((ln, ids[0]))
            continue
        captions.append(caption_text(rec["text"], f"{ann}:{ln}"))
        index.append(order[ids[0]])
    if missing:
        msg = ", ".join(f"line {ln}: image {i}" for ln, i in missing[:MAX_LISTED])
        if on_missing == "error":
            raise InputError(f"{name}: {len(missing)} text(s) in {ann} name images absent from the image source "
                             f"({msg}); pass on_missing='skip' to drop those texts")
        skipped = [{"where": f"{ann.name}:{ln}", "image": i, "reason": "text names a missing image"}
                   for ln, i in missing]
    if not captions:
        raise InputError(f"{name}: no usable texts in {ann}")
    return Benchmark(name, "retrieval", list(refs.values()), captions, np.asarray(index, dtype=np.int64),
                     root=str(root), files=files, skipped=skipped, meta={"format": fmt, "split": split})


def load_flickr30k_cn(root, split="test", on_missing="error") -> Benchmark:
    return load_chinese_clip(root, "flickr30k-cn", split, on_missing)


def load_coco_cn(root, split="test", on_missing="error") -> Benchmark:
    return load_chinese_clip(root, "coco-cn", split, on_missing)
