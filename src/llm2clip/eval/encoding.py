"""Benchmarks through a model: its images (decoded, preprocessed, batched, optionally in worker
processes, with a policy for files that do not decode) and texts, as float32 features on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from .benchmark import ON_MISSING, Benchmark


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
