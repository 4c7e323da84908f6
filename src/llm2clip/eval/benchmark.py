"""The loaded benchmark: images, captions with an explicit caption-to-image index (retrieval),
labels with class names (classification), or captions with groups (CRA); and the registry's entry type.

A :class:`Benchmark` records the sha256 of its annotation files, so two result files say whether
they scored the same data, and every entry it skipped, with the reason.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ON_MISSING = ("error", "skip")


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
        from ..fileio import image_errors, open_image

        src = self.images[i]
        try:
            if hasattr(src, "load_image"):  # generated or in-memory images
                return src.load_image().convert("RGB")
            return open_image(src.read_bytes() if isinstance(src, TsvImage) else src)
        except FileNotFoundError:
            raise InputError(f"{self.name}: image {i} ({src}) is missing") from None
        except image_errors() as err:
            raise InputError(f"{self.name}: image {i} ({src}) does not decode: {err}") from None

    def select_images(self, keep: Sequence[int], reason: str = "") -> Benchmark:
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
            kw.update(captions=[c for c, k in zip(self.captions, cap_keep, strict=True) if k],
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


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task: str
    loader: Callable[..., Benchmark]
    expects: str  # the files a local copy must have
    paper: str = ""  # what the paper reports on it
    builtin: bool = False  # needs no local copy (its loader takes no root, or an optional one)
