"""The long-caption sets of the paper: ShareGPT4V (the first 1,000 Share-Captioner entries),
Urban-1k (image/<i>.jpg with caption/<i>.txt) and DOCCI (the test records of its jsonlines)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...data.jsonl import read_jsonl
from ...errors import InputError
from ...hashing import file_sha256 as sha256_file
from ..benchmark import IMAGE_SUFFIXES, Benchmark
from .common import (
    MAX_LISTED,
    build_retrieval,
    caption_text,
    check_on_missing,
    digest_of,
    find_file,
    require_dir,
    stem_key,
)


def json_array_head(path: Path, n: int) -> list:
    """The first ``n`` items of a top-level JSON array, without parsing the rest (the ShareGPT4V
    file is 1.2M entries)."""
    dec = json.JSONDecoder()
    items, buf, pos = [], "", 0
    with open(path, encoding="utf-8") as f:
        def more() -> bool:
            nonlocal buf, pos
            chunk = f.read(1 << 20)
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def skip(chars: str) -> bool:  # advance past ``chars``; False at the end of the file
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf):
                    return True
                if not more():
                    return False

        if not skip(" \t\r\n\ufeff") or buf[pos] != "[":
            raise InputError(f"{path}: expected a JSON list")
        pos += 1
        while len(items) < n and skip(" \t\r\n,") and buf[pos] != "]":
            while True:
                try:
                    obj, pos = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    if not more():
                        raise InputError(f"{path}: entry {len(items)}: not valid JSON: {err.msg}") from None
            items.append(obj)
    return items


def load_sharegpt4v(root, ann_file="share-captioner_coco_lcs_sam_1246k_1107.json", image_root=None, n: int = 1000,
                    on_missing="error") -> Benchmark:
    """The first ``n`` entries of the Share-Captioner JSON; the caption is the first "gpt" turn.

    A skipped entry is not replaced by the next one: the pool is always the first ``n``."""
    check_on_missing(on_missing)
    root = require_dir(root, "sharegpt4v")
    ann = find_file(root, ann_file)
    image_root = Path(image_root) if image_root else root
    entries = []
    for e, rec in enumerate(json_array_head(ann, n)):
        where = f"{ann}: entry {e}"
        if not isinstance(rec, dict) or "image" not in rec or not isinstance(rec.get("conversations"), list):
            raise InputError(f"{where}: expected an object with 'image' and 'conversations'")
        gpt = [t for t in rec["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
        if not gpt:
            raise InputError(f"{where} ({rec['image']}): no 'gpt' turn holding the caption")
        entries.append((str(image_root / rec["image"]), [caption_text(gpt[0].get("value"), where)],
                        f"{ann.name} entry {e}"))
    if len(entries) < n:
        raise InputError(f"{ann}: only {len(entries)} entries, expected at least {n}")
    return build_retrieval("sharegpt4v", entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "sharegpt4v-json", "first_n": n, "image_root": str(image_root)})


def load_urban1k(root, on_missing="error") -> Benchmark:
    """Urban-1k: image/<i>.jpg with caption/<i>.txt, paired by stem, in numeric order."""
    check_on_missing(on_missing)
    root = require_dir(root, "urban1k")
    img_dir, cap_dir = root / "image", root / "caption"
    for d in (img_dir, cap_dir):
        if not d.is_dir():
            raise InputError(f"{d}: folder not found (Urban-1k has image/ and caption/)")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    caps = {p.stem: p for p in cap_dir.iterdir() if p.suffix == ".txt"}
    no_cap = sorted(set(images) - set(caps), key=stem_key)
    if no_cap:
        raise InputError(f"urban1k: {len(no_cap)} image(s) have no caption file in {cap_dir}: "
                         + ", ".join(images[s].name for s in no_cap[:MAX_LISTED]))
    stems = sorted(caps, key=stem_key)
    entries, digests = [], []
    for s in stems:
        text = caps[s].read_text(encoding="utf-8")
        digests.append((caps[s].name, hashlib.sha256(text.encode("utf-8")).hexdigest()))
        path = images[s] if s in images else img_dir / f"{s}.jpg"
        entries.append((str(path), [caption_text(text, str(caps[s]))], f"caption/{caps[s].name}"))
    if not entries:
        raise InputError(f"urban1k: no caption files in {cap_dir}")
    return build_retrieval("urban1k", entries, str(cap_dir), on_missing, root,
                            {"caption/*.txt": digest_of(digests)}, {"format": "urban1k-folders"})


def load_docci(root, ann_file="docci_descriptions.jsonlines", image_dir="images", split="test",
               on_missing="error") -> Benchmark:
    """DOCCI: the ``split`` records of docci_descriptions.jsonlines, images in ``image_dir``."""
    check_on_missing(on_missing)
    root = require_dir(root, "docci")
    ann = find_file(root, ann_file)
    image_dir = root / image_dir
    entries = []
    for ln, rec in read_jsonl(ann):
        for key in ("split", "image_file", "description"):
            if key not in rec:
                raise InputError(f"{ann}:{ln}: missing field '{key}'")
        if rec["split"] != split:
            continue
        entries.append((str(image_dir / rec["image_file"]),
                        [caption_text(rec["description"], f"{ann}:{ln} ({rec.get('example_id')})")],
                        f"{ann.name}:{ln}"))
    if not entries:
        raise InputError(f"{ann}: no records with split == {split!r}")
    return build_retrieval("docci", entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "docci-jsonlines", "split": split})
