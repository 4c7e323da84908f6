"""Built in (no files): held-out generated scenes (llm2clip.data.scenes, far from any training offset),
one caption of a kind (short or dense) per image; retrieval in both directions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputError
from ..benchmark import Benchmark
from .common import digest_texts

SCENES_OFFSET = 1_000_000  # training sets start at 0; this range is held out
SCENES_COUNT = 500


@dataclass(frozen=True)
class SceneImage:
    """A generated scene, rendered when loaded (picklable for DataLoader workers)."""

    seed: int
    index: int
    size: int
    min_objects: int = 2
    max_objects: int = 5

    def __str__(self) -> str:
        return f"scene{self.seed}-{self.index}@{self.size}px"

    def load_image(self):
        from ...data.scenes import make_scene

        return make_scene(self.seed, self.index, self.min_objects, self.max_objects).render(self.size)


def load_scenes(kind: str = "dense", count: int = SCENES_COUNT, seed: int = 0, offset: int = SCENES_OFFSET,
                render_size: int = 64, min_objects: int = 2, max_objects: int = 5) -> Benchmark:
    """Scenes ``offset .. offset+count-1`` of generator ``seed``, each with its ``kind`` caption."""
    from ...data.scenes import SceneSet

    if kind not in ("short", "dense"):
        raise InputError(f"scenes: caption kind must be short or dense, got {kind!r}")
    if count < 2 or render_size < 8 or offset < 0:
        raise InputError(f"scenes: need count >= 2, render_size >= 8, offset >= 0 (got {count}, {render_size}, "
                         f"{offset})")
    try:
        scenes = SceneSet(count, seed, offset, min_objects, max_objects, render_size)
    except ValueError as err:
        raise InputError(f"scenes: {err}") from None
    images, captions = [], []
    for i in range(count):
        images.append(SceneImage(seed, offset + i, render_size, min_objects, max_objects))
        captions.append(scenes[i].captions()[kind])
    name = f"scenes-{kind}"
    return Benchmark(name, "retrieval", images, captions, np.arange(count), root="(generated)",
                     files={"generated captions": digest_texts(captions)},
                     meta={"format": "generated-scenes", "caption_kind": kind, "seed": seed, "offset": offset,
                           "count": count, "render_size": render_size, "objects": [min_objects, max_objects]})


def load_scenes_short(**kw) -> Benchmark:
    return load_scenes("short", **kw)


def load_scenes_dense(**kw) -> Benchmark:
    return load_scenes("dense", **kw)
