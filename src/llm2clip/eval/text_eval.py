"""Scoring text encoders by CRA on caption sets: the `llm2clip eval-text` command's engine."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

from ..data.captions import CaptionSet
from ..fileio import markdown_table as markdown_table_of
from .cra import caption_retrieval_accuracy


def score_encoders(encoders: Sequence[tuple[str, object]], caption_sets: Sequence[CaptionSet],
                   ks: Sequence[int] = (1, 5, 10), progress: bool | None = None) -> list[dict]:
    """One row per (encoder, caption set). ``encoders`` are (label, config); each is loaded once."""
    from ..text import build_text_encoder

    rows = []
    for label, cfg in encoders:
        t0 = time.perf_counter()
        enc = build_text_encoder(cfg)
        load_s = time.perf_counter() - t0
        for cs in caption_sets:
            t0 = time.perf_counter()
            emb = enc.encode(cs.captions, progress=progress)
            enc_s = time.perf_counter() - t0
            res = caption_retrieval_accuracy(emb, cs.groups, ks)
            rows.append({"encoder": label, "caption_set": cs.name, **res, "encode_s": round(enc_s, 2),
                         "load_s": round(load_s, 2), "identity": enc.identity()})
        del enc
        gc.collect()
    return rows


def markdown_table(rows: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> str:
    head = ["encoder", "caption set", *[f"R@{k}" for k in ks], "pool"]
    return markdown_table_of(head, [[r["encoder"], r["caption_set"], *[f"{r[f'R@{k}']:.3f}" for k in ks],
                                     r["pool_size"]] for r in rows])
