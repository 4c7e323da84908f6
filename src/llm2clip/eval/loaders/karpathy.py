"""Flickr30k and COCO: the Karpathy test split as Salesforce (BLIP/LAVIS) ships it, a JSON list of
``{"image": "<path relative to the image root>", "caption": ["...", ...]}``."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import Benchmark
from .common import build_retrieval, caption_text, check_on_missing, find_file, require_dir


def load_karpathy(root: str | Path, ann_file: str | Path, name: str = "karpathy", image_root: str | Path | None = None,
                  min_captions: int = 1, max_captions: int | None = None, on_missing: str = "error") -> Benchmark:
    """Salesforce Karpathy-split JSON: a list of {"image": relpath, "caption": [str, ...]}."""
    check_on_missing(on_missing)
    root = require_dir(root, name)
    ann = find_file(root, ann_file)
    image_root = Path(image_root) if image_root else root
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{ann}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise InputError(f"{ann}: expected a JSON list of {{'image', 'caption'}} entries")
    entries = []
    for e, rec in enumerate(data):
        where = f"{ann}: entry {e}"
        if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
            raise InputError(f"{where}: expected an object with 'image' and 'caption'")
        caps = rec["caption"]
        if isinstance(caps, str):  # the train-split layout has one string per entry
            raise InputError(f"{where} ({rec['image']}): 'caption' is a single string; the test-split "
                             f"format has a list of captions per image")
        if not isinstance(caps, list):
            raise InputError(f"{where} ({rec['image']}): 'caption' must be a list")
        if len(caps) < min_captions or (max_captions is not None and len(caps) > max_captions):
            want = (f"exactly {min_captions}" if max_captions == min_captions else
                    f"at least {min_captions}" if max_captions is None else f"{min_captions} to {max_captions}")
            raise InputError(f"{where} ({rec['image']}): {len(caps)} captions, expected {want}")
        entries.append((str(image_root / rec["image"]),
                        [caption_text(c, f"{where} caption {j}") for j, c in enumerate(caps)],
                        f"{ann.name} entry {e}"))
    return build_retrieval(name, entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "karpathy-json", "image_root": str(image_root)})


def load_flickr30k(root, ann_file="flickr30k_test.json", image_root=None, on_missing="error") -> Benchmark:
    """Flickr30k 1k Karpathy test; every image has exactly 5 captions."""
    return load_karpathy(root, ann_file, "flickr30k", image_root, 5, 5, on_missing)


def load_coco(root, ann_file="coco_karpathy_test.json", image_root=None, on_missing="error") -> Benchmark:
    """COCO 5k Karpathy test; at least 5 captions per image (some have 6 or 7: 25,010 in all)."""
    return load_karpathy(root, ann_file, "coco", image_root, 5, None, on_missing)
