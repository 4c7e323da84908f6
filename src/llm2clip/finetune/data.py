"""Stage-1 data: caption groups, contrastive pairs, and plain text for MNTP.

A caption group holds the captions of one image (or one subject): they are positives of each
other and never negatives. Pairs are drawn as the official code draws them (docs/METHOD.md 1.3): a
query, a positive from the same group, and optionally one random hard negative from another
group, of the positive's kind; with kinds (short / dense) the direction is a coin flip.
Sampling is a pure function of (seed, step), so a resumed run draws the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.captions import cupl_caption_set
from ..data.jsonl import is_manifest, read_jsonl, read_manifest
from ..errors import InputError


@dataclass
class CaptionGroup:
    group: str
    captions: list[str]
    kinds: list[str] | None = None  # one kind per caption, e.g. "short" / "dense"


@dataclass
class Pair:
    query: str
    positive: str
    negative: str | None
    group: int  # index of the group in the sampler (an integer, to gather across processes)
    negative_group: int = -1
    direction: str = ""  # e.g. "short->dense"


@dataclass
class GroupedCaptions:
    groups: list[CaptionGroup] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)

    def all_captions(self) -> list[str]:
        return [c for g in self.groups for c in g.captions]


def _manifest_groups(path: Path) -> GroupedCaptions:
    """An image manifest as caption groups: the captions of one image are one group (those with two or more)."""
    by: dict[str, CaptionGroup] = {}
    for c in read_manifest(path, need_text=True):
        g = by.setdefault(c.image, CaptionGroup(c.image, [], []))
        g.captions.append(c.text.strip())
        g.kinds.append(c.kind)
    groups = [g for g in by.values() if len(g.captions) > 1]
    if not groups:
        raise InputError(f"{path}: no image has two or more captions; caption contrast needs pairs")
    return GroupedCaptions(groups)


def load_groups_jsonl(path: str | Path) -> GroupedCaptions:
    """Caption groups from an image manifest (the captions of one image form a group; see
    llm2clip.data.jsonl.read_manifest), or JSONL of {"group": id, "captions": [...], "kinds": [...]} (kinds
    optional)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: caption-group file not found")
    if is_manifest(path):
        return _manifest_groups(path)
    out, seen = [], set()
    for ln, rec in read_jsonl(path):
        if "group" not in rec or "captions" not in rec:
            raise InputError(f"{path}:{ln}: expected an object with 'group' and 'captions'")
        caps = rec["captions"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise InputError(f"{path}:{ln}: 'captions' must be a non-empty list of non-empty strings")
        kinds = rec.get("kinds")
        if kinds is not None and (not isinstance(kinds, list) or len(kinds) != len(caps)):
            raise InputError(f"{path}:{ln}: 'kinds' must list one kind per caption ({len(caps)})")
        gid = str(rec["group"])
        if gid in seen:
            raise InputError(f"{path}:{ln}: duplicate group id {gid!r}")
        seen.add(gid)
        out.append(CaptionGroup(gid, [c.strip() for c in caps], [str(k) for k in kinds] if kinds else None))
    if not out:
        raise InputError(f"{path}: no caption groups")
    return GroupedCaptions(out)


def cupl_train_groups(per_class: int | None = None, seed: int = 0) -> GroupedCaptions:
    """The CuPL training classes (the held-out classes are never used), one group per class."""
    cs = cupl_caption_set("train", None, per_class or 10_000, seed=seed)
    by: dict[str, list[str]] = {}
    for c, g in zip(cs.captions, cs.groups):
        by.setdefault(g, []).append(c)
    return GroupedCaptions([CaptionGroup(g, caps) for g, caps in by.items() if len(caps) > 1])


def merge_groups(parts: Sequence[GroupedCaptions]) -> GroupedCaptions:
    out, seen = [], set()
    for p in parts:
        for g in p.groups:
            if g.group in seen:
                raise InputError(f"group id {g.group!r} appears in two sources")
            seen.add(g.group)
            out.append(g)
    return GroupedCaptions(out)


class PairSampler:
    """Batches of pairs as a pure function of (seed, step): resumable without saved state."""

    def __init__(self, data: GroupedCaptions, seed: int = 0, hard_negatives: bool = True):
        self.groups = [g for g in data.groups if len(g.captions) > 1]
        if len(self.groups) < 2:
            raise InputError("contrastive training needs at least 2 groups with 2 or more captions each")
        self.seed = seed
        self.hard_negatives = hard_negatives

    def _pair(self, rng: random.Random, gi: int) -> Pair:
        g = self.groups[gi]
        idx = list(range(len(g.captions)))
        direction = ""
        if g.kinds and len(set(g.kinds)) > 1:
            kinds = sorted(set(g.kinds))
            qk, pk = rng.sample(kinds, 2)  # e.g. short->dense or dense->short
            q = rng.choice([i for i in idx if g.kinds[i] == qk])
            p = rng.choice([i for i in idx if g.kinds[i] == pk])
            direction = f"{qk}->{pk}"
        else:
            q, p = rng.sample(idx, 2)
            pk = None
        neg, ngid = None, -1
        if self.hard_negatives:
            nj = rng.randrange(len(self.groups) - 1)
            nj += nj >= gi
            ng = self.groups[nj]
            cand = [i for i in range(len(ng.captions)) if pk is None or not ng.kinds or ng.kinds[i] == pk]
            neg, ngid = ng.captions[rng.choice(cand or list(range(len(ng.captions))))], nj
        return Pair(g.captions[q], g.captions[p], neg, gi, ngid, direction)

    def batch(self, step: int, size: int) -> list[Pair]:
        """``size`` pairs from distinct groups (a group's captions are never its own negatives)."""
        rng = random.Random(f"{self.seed}:{step}")
        chosen = rng.sample(range(len(self.groups)), min(size, len(self.groups)))
        return [self._pair(rng, gi) for gi in chosen]


def load_text_corpus(path: str | Path) -> list[str]:
    """Plain text for MNTP: one document per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: text corpus not found")
    docs = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not docs:
        raise InputError(f"{path}: empty text corpus")
    return docs
