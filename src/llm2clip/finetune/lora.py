"""LoRA on the caption encoder's body, and the frozen-trunk cache.

LoRA goes on the transformer body (not the LM-head wrapper), so the saved adapter's keys are
the body's and it merges into the caption encoder as it is (the official MNTP adapters did not:
docs/METHOD.md 1.2).

When LoRA sits on the top N layers only, the layers below are frozen and, with padding-
invariant bidirectional attention, their output for a caption never changes. The trunk cache
computes it once per token sequence; training then runs only the top N layers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..text.encoder import CaptionBatch, CaptionEncoder, TokenizedCaption


def add_lora(body: nn.Module, r: int, alpha: int, dropout: float, target_modules: Sequence[str],
             top_layers: int | None = None):
    """Wrap ``body`` (an AutoModel) with fresh LoRA; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    n = body.config.num_hidden_layers
    kw = {}
    if top_layers is not None and top_layers < n:
        kw = dict(layers_to_transform=list(range(n - top_layers, n)), layers_pattern="layers")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     bias="none", **kw)
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5: not ours to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(body, cfg)


def inner_body(model: nn.Module) -> nn.Module:
    """The plain transformer body under a PEFT wrapper: the module that owns ``layers``.

    (PeftModel forwards attribute reads to the wrapped model, so ``hasattr(peft, "layers")`` is
    true of the wrapper too, while setting ``layers`` on it would change nothing that runs.)
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if "layers" not in model._modules:
        raise TypeError(f"{type(model).__name__} has no decoder layers to split into trunk and top")
    return model


@contextlib.contextmanager
def swapped(body: nn.Module, **modules: nn.Module):
    old = {k: getattr(body, k) for k in modules}
    try:
        for k, m in modules.items():
            setattr(body, k, m)
        yield
    finally:
        for k, m in old.items():
            setattr(body, k, m)


class _CachedTrunk(nn.Module):
    """Stands in for the frozen bottom layers: returns their precomputed output."""

    attention_type = "full_attention"

    def __init__(self):
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        assert self.states is not None and self.states.shape[:2] == hidden_states.shape[:2]
        return self.states.to(hidden_states.dtype)


class TrunkCache:
    """Output of the frozen bottom layers per token sequence, computed once."""

    def __init__(self, encoder: CaptionEncoder, top_layers: int, dtype: torch.dtype = torch.float32, autocast=None):
        self.encoder = encoder
        self.body = inner_body(encoder.model)
        n = self.body.config.num_hidden_layers
        self.split = n - top_layers
        self.dtype = dtype
        self.store: dict[tuple[int, ...], torch.Tensor] = {}
        self.trunk = _CachedTrunk()
        self.autocast = autocast or contextlib.nullcontext

    @torch.no_grad()
    def fill(self, items: Sequence[TokenizedCaption], batch_size: int = 64, progress: bool | None = False) -> None:
        todo = list({tuple(t.ids): t for t in items if tuple(t.ids) not in self.store}.values())
        todo.sort(key=lambda t: len(t.ids))
        if not todo:
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="frozen trunk", unit="caption", leave=False,
                   disable=(not progress) if progress is not None else None)
        layers = self.body.layers
        with swapped(self.body, layers=nn.ModuleList(list(layers)[: self.split]), norm=nn.Identity()), self.autocast():
            for s in range(0, len(todo), batch_size):
                part = todo[s : s + batch_size]
                batch = self.encoder.collate(part)
                h = self.encoder.hidden_states(batch.to(self.encoder.device))
                for b, t in enumerate(part):
                    self.store[tuple(t.ids)] = h[b, -len(t.ids):].to(self.dtype).cpu()
                bar.update(len(part))
        bar.close()

    def states(self, items: Sequence[TokenizedCaption], batch: CaptionBatch) -> torch.Tensor:
        """Cached trunk output for a left-padded batch (zeros at padding)."""
        self.fill(items)
        B, T = batch.input_ids.shape
        H = self.body.config.hidden_size
        out = torch.zeros(B, T, H, dtype=self.dtype)
        for b, t in enumerate(items):
            out[b, T - len(t.ids):] = self.store[tuple(t.ids)]
        return out

    def forward(self, items: Sequence[TokenizedCaption], batch: CaptionBatch) -> torch.Tensor:
        """Pooled embeddings through the top layers only (same result as the full model)."""
        self.trunk.states = self.states(items, batch).to(self.encoder.device)
        top = nn.ModuleList([self.trunk, *list(self.body.layers)[self.split :]])
        try:
            with swapped(self.body, layers=top):
                return self.encoder.forward(batch)
        finally:
            self.trunk.states = None
