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

Formats (``llm2clip.eval.benchmarks.REGISTRY`` lists them, with the files each expects):

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
* Built in (no files; ``llm2clip.eval.builtin``): ``scenes-short`` / ``scenes-dense`` (held-out
  generated scenes), ``fashion-mnist`` (the Debian package's test split, zero-shot), ``cupl-cra``
  (CRA on the held-out CuPL classes).
* ``imagenet``: a validation folder, either one sub-folder per class (sorted names give the label
  order, as ImageFolder does) or flat images with ``labels.txt`` (``<file name> <integer label>``
  per line, the official ``--imagenet-val-text`` format). Class names: given, or the 1,000
  ImageNet names of clip-benchmark when there are 1,000 classes, else the folder names.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.jsonl import read_jsonl
from ..errors import InputError
from ..hashing import file_sha256 as sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ON_MISSING = ("error", "skip")
_MAX_LISTED = 10


# ----------------------------------------------------------------------------------------------
# The loaded benchmark


@dataclass(frozen=True)
class TsvImage:
    """An image stored base64-encoded on one line of a TSV file (Chinese-CLIP's format)."""

    path: str
    offset: int
    image_id: str

    def __str__(self) -> str:
        return f"{self.path}#{self.image_id}"

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            line = f.readline().rstrip(b"\r\n")
        _, _, payload = line.partition(b"\t")
        # Chinese-CLIP writes url-safe base64; this decoder also accepts the standard alphabet.
        return base64.urlsafe_b64decode(payload.strip() + b"=" * (-len(payload.strip()) % 4))


class BenchmarkUnavailable(InputError):
    """A built-in benchmark whose data is not installed here: callers may skip it with this message."""


@dataclass
class Benchmark:
    name: str
    task: str  # "retrieval", "classification" or "cra" (captions with groups, no images)
    images: list  # image paths (str), TsvImage, or objects with load_image() -> PIL image
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    root: str = ""
    files: dict[str, str] = field(default_factory=dict)  # annotation file -> sha256
    skipped: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    groups: list[str] | None = None  # cra: the group of each caption
    prompts: dict | None = None  # classification: prompt sets that come with the data, label -> prompts

    def __post_init__(self):
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if self.task == "retrieval":
            if len(self.caption_image) != len(self.captions):
                raise InputError(f"{self.name}: {len(self.captions)} captions but {len(self.caption_image)} indices")
            ci = self.caption_image
            if len(ci) and (ci.min() < 0 or ci.max() >= len(self.images)):
                raise InputError(f"{self.name}: a caption points outside the {len(self.images)} images")
        elif self.task == "classification":
            if self.labels is None or self.classnames is None:
                raise InputError(f"{self.name}: a classification benchmark needs labels and class names")
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != len(self.images):
                raise InputError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
                raise InputError(f"{self.name}: a label is outside 0..{len(self.classnames) - 1}")
        elif self.task == "cra":
            if self.groups is None or len(self.groups) != len(self.captions):
                raise InputError(f"{self.name}: a CRA benchmark needs one group per caption")
        else:
            raise InputError(f"{self.name}: unknown task {self.task!r}")

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, i: int) -> str:
        return str(self.images[i])

    def open_image(self, i: int):
        """Image ``i`` as RGB; an error names the file and the entry."""
        from PIL import Image

        src = self.images[i]
        try:
            if hasattr(src, "load_image"):  # generated or in-memory images
                return src.load_image().convert("RGB")
            data = src.read_bytes() if isinstance(src, TsvImage) else None
            img = Image.open(io.BytesIO(data) if data is not None else src)
            img.load()
            return img.convert("RGB")
        except FileNotFoundError:
            raise InputError(f"{self.name}: image {i} ({src}) is missing") from None
        except Exception as err:  # PIL raises many types for corrupt files
            raise InputError(f"{self.name}: image {i} ({src}) does not decode: {err}") from None

    def select_images(self, keep: Sequence[int], reason: str = "") -> "Benchmark":
        """The benchmark restricted to images ``keep`` (in that order); their captions follow them."""
        keep = np.asarray(keep, dtype=np.int64)
        new_of_old = np.full(len(self.images), -1, dtype=np.int64)
        new_of_old[keep] = np.arange(len(keep))
        dropped = np.setdiff1d(np.arange(len(self.images)), keep)
        skipped = list(self.skipped) + [{"where": f"loaded image {int(i)}", "image": self.image_name(int(i)),
                                         "reason": reason} for i in dropped]
        kw = dict(images=[self.images[i] for i in keep], skipped=skipped)
        if self.task == "retrieval":
            cap_keep = new_of_old[self.caption_image] >= 0
            kw.update(captions=[c for c, k in zip(self.captions, cap_keep) if k],
                      caption_image=new_of_old[self.caption_image[cap_keep]])
        else:
            kw.update(labels=self.labels[keep])
        return replace(self, **kw)

    def identity(self) -> dict:
        """What the results record about the data: enough to tell whether two runs scored the same."""
        out = {"name": self.name, "task": self.task, "root": self.root, "files": dict(self.files),
               "images": len(self.images), "skipped": len(self.skipped),
               "skipped_entries": self.skipped[:100], **self.meta}
        if self.task == "retrieval":
            out["captions"] = len(self.captions)
        elif self.task == "cra":
            out.update(captions=len(self.captions), groups=len(set(self.groups)))
        else:
            out["classes"] = len(self.classnames)
        if self.prompts:
            out["prompt_sets"] = list(self.prompts)
        return out


# ----------------------------------------------------------------------------------------------
# Encoding through a model (images and texts)


def _batched(n: int, batch_size: int, progress: bool | None, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=progress is False or (progress is None and n <= 4 * batch_size),
                unit="batch")


@torch.no_grad()
def encode_texts(encode_text: Callable, texts: Sequence[str], batch_size: int = 256,
                 progress: bool | None = None) -> torch.Tensor:
    """Texts through a model's own text path (``encode_text(list_of_str) -> [B, D]``), float32 on CPU."""
    out = []
    for s in _batched(len(texts), batch_size, progress, "texts"):
        chunk = list(texts[s: s + batch_size])
        f = torch.as_tensor(encode_text(chunk))
        if f.ndim != 2 or f.shape[0] != len(chunk):
            raise InputError(f"encode_text returned shape {tuple(f.shape)} for {len(chunk)} texts")
        out.append(f.detach().float().cpu())
    if not out:
        raise InputError("no texts to encode")
    return torch.cat(out)


class _ImageDataset(torch.utils.data.Dataset):
    """(index, image or None, error or None): a bad image is reported, not raised, so the caller's
    policy applies to it even inside a worker process."""

    def __init__(self, bench: Benchmark, preprocess: Callable | None):
        self.bench, self.preprocess = bench, preprocess

    def __len__(self) -> int:
        return len(self.bench)

    def __getitem__(self, i: int):
        try:
            img = self.bench.open_image(i)
        except InputError as err:
            return i, None, str(err)
        return i, (self.preprocess(img) if self.preprocess else img), None


@torch.no_grad()
def encode_benchmark_images(model, bench: Benchmark, *, preprocess: Callable | None = None, batch_size: int = 64,
                            on_bad: str = "error", num_workers: int = 0,
                            progress: bool | None = None) -> tuple[torch.Tensor, Benchmark]:
    """(features, benchmark): with ``on_bad="skip"`` undecodable images are dropped from both, and
    listed in the returned benchmark's ``skipped``; with "error" the first one raises.
    ``num_workers`` > 0 decodes and preprocesses in that many worker processes."""
    from tqdm.auto import tqdm

    if on_bad not in ON_MISSING:
        raise InputError(f"on_bad must be one of {ON_MISSING}, got {on_bad!r}")
    loader = torch.utils.data.DataLoader(_ImageDataset(bench, preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list)
    n_batches = -(-len(bench) // batch_size)
    feats, kept = [], []
    for items in tqdm(loader, total=n_batches, desc=f"{bench.name} images", unit="batch",
                      disable=progress is False or (progress is None and n_batches <= 4)):
        good = [(i, x) for i, x, err in items if err is None]
        bad = [err for _, _, err in items if err is not None]
        if bad and on_bad == "error":
            raise InputError(bad[0])
        if not good:
            continue
        xs = [x for _, x in good]
        batch = torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs
        f = torch.as_tensor(model.encode_image(batch))
        if f.ndim != 2 or f.shape[0] != len(xs):
            raise InputError(f"encode_image returned shape {tuple(f.shape)} for {len(xs)} images")
        feats.append(f.detach().float().cpu())
        kept.extend(i for i, _ in good)
    if not feats:
        raise InputError(f"{bench.name}: no image could be decoded")
    if len(kept) < len(bench):
        bench = bench.select_images(kept, "image does not decode")
    return torch.cat(feats), bench


# ----------------------------------------------------------------------------------------------
# Helpers shared by the loaders



def _digest_of(items: Sequence[tuple[str, str]]) -> str:
    """One sha256 over (name, value) pairs: identity of a folder of small files or of a listing."""
    h = hashlib.sha256()
    for name, value in items:
        h.update(name.encode("utf-8") + b"\0" + value.encode("utf-8") + b"\n")
    return h.hexdigest()


def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise InputError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")


def _find_file(root: Path, name: str | Path, subdirs: Sequence[str] = ("", "annotations")) -> Path:
    """``name`` under root or one of its usual sub-folders, else as a path of its own."""
    p = Path(name)
    tried = [] if p.is_absolute() else [root / d / name for d in subdirs]
    for t in tried + [p]:
        if t.is_file():
            return t
    raise InputError(f"annotation file {name} not found (looked in {', '.join(str(t.parent) for t in tried + [p])})")


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: {what} folder not found")
    return root


def _missing_message(name: str, ann: str, missing: list[tuple[str, str]]) -> str:
    listed = ", ".join(f"{w}: {p}" for w, p in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return (f"{name}: {len(missing)} image(s) listed in {ann} are missing ({listed}{more}); "
            f"fix the image root or pass on_missing='skip' to drop them with their captions")


def _build_retrieval(name: str, entries: list[tuple[str, list[str], str]], ann: str, on_missing: str,
                     root: Path, files: dict, meta: dict) -> Benchmark:
    """entries: (image path, captions, where in the annotations) in annotation order; applies the
    missing-image policy."""
    missing = [(w, p) for p, _, w in entries if not Path(p).is_file()]
    skipped = []
    if missing:
        if on_missing == "error":
            raise InputError(_missing_message(name, ann, missing))
        skipped = [{"where": w, "image": p, "reason": "image file missing"} for w, p in missing]
        entries = [x for x in entries if Path(x[0]).is_file()]
    images, captions, index = [], [], []
    for i, (path, caps, _) in enumerate(entries):
        images.append(str(path))
        captions.extend(caps)
        index.extend([i] * len(caps))
    if not images:
        raise InputError(f"{name}: no usable entries in {ann}")
    return Benchmark(name, "retrieval", images, captions, np.asarray(index, dtype=np.int64), root=str(root),
                     files=files, skipped=skipped, meta=meta)


def _caption_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: caption must be a non-empty string, got {value!r:.60}")
    return value.strip()


# ----------------------------------------------------------------------------------------------
# Loaders


def load_karpathy(root: str | Path, ann_file: str | Path, name: str = "karpathy", image_root: str | Path | None = None,
                  min_captions: int = 1, max_captions: int | None = None, on_missing: str = "error") -> Benchmark:
    """Salesforce Karpathy-split JSON: a list of {"image": relpath, "caption": [str, ...]}."""
    _check_on_missing(on_missing)
    root = _require_dir(root, name)
    ann = _find_file(root, ann_file)
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
                        [_caption_text(c, f"{where} caption {j}") for j, c in enumerate(caps)],
                        f"{ann.name} entry {e}"))
    return _build_retrieval(name, entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "karpathy-json", "image_root": str(image_root)})


def load_flickr30k(root, ann_file="flickr30k_test.json", image_root=None, on_missing="error") -> Benchmark:
    """Flickr30k 1k Karpathy test; every image has exactly 5 captions."""
    return load_karpathy(root, ann_file, "flickr30k", image_root, 5, 5, on_missing)


def load_coco(root, ann_file="coco_karpathy_test.json", image_root=None, on_missing="error") -> Benchmark:
    """COCO 5k Karpathy test; at least 5 captions per image (some have 6 or 7: 25,010 in all)."""
    return load_karpathy(root, ann_file, "coco", image_root, 5, None, on_missing)


def _json_array_head(path: Path, n: int) -> list:
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
    _check_on_missing(on_missing)
    root = _require_dir(root, "sharegpt4v")
    ann = _find_file(root, ann_file)
    image_root = Path(image_root) if image_root else root
    entries = []
    for e, rec in enumerate(_json_array_head(ann, n)):
        where = f"{ann}: entry {e}"
        if not isinstance(rec, dict) or "image" not in rec or not isinstance(rec.get("conversations"), list):
            raise InputError(f"{where}: expected an object with 'image' and 'conversations'")
        gpt = [t for t in rec["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
        if not gpt:
            raise InputError(f"{where} ({rec['image']}): no 'gpt' turn holding the caption")
        entries.append((str(image_root / rec["image"]), [_caption_text(gpt[0].get("value"), where)],
                        f"{ann.name} entry {e}"))
    if len(entries) < n:
        raise InputError(f"{ann}: only {len(entries)} entries, expected at least {n}")
    return _build_retrieval("sharegpt4v", entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "sharegpt4v-json", "first_n": n, "image_root": str(image_root)})


def _stem_key(stem: str):
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def load_urban1k(root, on_missing="error") -> Benchmark:
    """Urban-1k: image/<i>.jpg with caption/<i>.txt, paired by stem, in numeric order."""
    _check_on_missing(on_missing)
    root = _require_dir(root, "urban1k")
    img_dir, cap_dir = root / "image", root / "caption"
    for d in (img_dir, cap_dir):
        if not d.is_dir():
            raise InputError(f"{d}: folder not found (Urban-1k has image/ and caption/)")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    caps = {p.stem: p for p in cap_dir.iterdir() if p.suffix == ".txt"}
    no_cap = sorted(set(images) - set(caps), key=_stem_key)
    if no_cap:
        raise InputError(f"urban1k: {len(no_cap)} image(s) have no caption file in {cap_dir}: "
                         + ", ".join(images[s].name for s in no_cap[:_MAX_LISTED]))
    stems = sorted(caps, key=_stem_key)
    entries, digests = [], []
    for s in stems:
        text = caps[s].read_text(encoding="utf-8")
        digests.append((caps[s].name, hashlib.sha256(text.encode("utf-8")).hexdigest()))
        path = images[s] if s in images else img_dir / f"{s}.jpg"
        entries.append((str(path), [_caption_text(text, str(caps[s]))], f"caption/{caps[s].name}"))
    if not entries:
        raise InputError(f"urban1k: no caption files in {cap_dir}")
    return _build_retrieval("urban1k", entries, str(cap_dir), on_missing, root,
                            {"caption/*.txt": _digest_of(digests)}, {"format": "urban1k-folders"})


def load_docci(root, ann_file="docci_descriptions.jsonlines", image_dir="images", split="test",
               on_missing="error") -> Benchmark:
    """DOCCI: the ``split`` records of docci_descriptions.jsonlines, images in ``image_dir``."""
    _check_on_missing(on_missing)
    root = _require_dir(root, "docci")
    ann = _find_file(root, ann_file)
    image_dir = root / image_dir
    entries = []
    for ln, rec in read_jsonl(ann):
        for key in ("split", "image_file", "description"):
            if key not in rec:
                raise InputError(f"{ann}:{ln}: missing field '{key}'")
        if rec["split"] != split:
            continue
        entries.append((str(image_dir / rec["image_file"]),
                        [_caption_text(rec["description"], f"{ann}:{ln} ({rec.get('example_id')})")],
                        f"{ann.name}:{ln}"))
    if not entries:
        raise InputError(f"{ann}: no records with split == {split!r}")
    return _build_retrieval("docci", entries, str(ann), on_missing, root, {ann.name: sha256_file(ann)},
                            {"format": "docci-jsonlines", "split": split})


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
    _check_on_missing(on_missing)
    root = _require_dir(root, name)
    ann = _find_file(root, f"{split}_texts.jsonl")
    tsv, folder = root / f"{split}_imgs.tsv", root / f"{split}_images"
    files = {ann.name: sha256_file(ann)}
    if tsv.is_file():
        refs: dict = _tsv_index(tsv)
        files[tsv.name] = sha256_file(tsv)
        fmt = "chinese-clip-tsv"
    elif folder.is_dir():
        refs = {p.stem: str(p) for p in sorted(folder.iterdir(), key=lambda p: _stem_key(p.stem))
                if p.suffix.lower() in IMAGE_SUFFIXES}
        files[f"{folder.name}/"] = _digest_of([(k, Path(v).name) for k, v in refs.items()])
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
        captions.append(_caption_text(rec["text"], f"{ann}:{ln}"))
        index.append(order[ids[0]])
    if missing:
        msg = ", ".join(f"line {ln}: image {i}" for ln, i in missing[:_MAX_LISTED])
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
    from ..assets import clip_benchmark_file

    return json.loads(clip_benchmark_file("en_classnames.json").read_text(encoding="utf-8"))["imagenet1k"]


def load_imagenet(root, classnames=None, labels_file: str = "labels.txt", on_missing="error") -> Benchmark:
    """ImageNet val: class sub-folders (sorted = label order) or flat images + labels_file."""
    _check_on_missing(on_missing)
    root = _require_dir(root, "imagenet")
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
                raise InputError(_missing_message("imagenet", str(lab_path), missing))
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
    rel = [(str(Path(p).relative_to(root)), str(l)) for p, l in zip(images, labels)]
    files["listing"] = _digest_of(rel)
    return Benchmark("imagenet", "classification", images, labels=np.asarray(labels), classnames=names,
                     root=str(root), files=files, skipped=skipped,
                     meta={"format": fmt, "classnames_source": src})


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task: str
    loader: Callable[..., Benchmark]
    expects: str  # the files a local copy must have
    paper: str = ""  # what the paper reports on it
    builtin: bool = False  # needs no local copy (its loader takes no root, or an optional one)


REGISTRY: dict[str, BenchmarkSpec] = {}


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
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
):
    register(_spec)


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
    rows = ["| benchmark | task | expected files | paper |", "|---|---|---|---|"]
    rows += [f"| {s.name} | {s.task} | {s.expects} | {s.paper} |" for s in REGISTRY.values()]
    return "\n".join(rows)


from . import builtin as _builtin  # noqa: E402,F401  registers the built-in sets
