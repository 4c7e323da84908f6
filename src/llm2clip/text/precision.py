"""Mixed precision for an fp32 caption encoder: some linear layers with bf16 weights and matmuls.

Only the matmuls that carry most of the compute (the MLP projections) go to bf16; the residual stream, norms,
attention (softmax and the query/key projections, whose errors move the attention of outlier tokens) and
pooling stay fp32. A bf16 linear takes fp32 in and gives fp32 out, so the model around it does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class BF16Linear(torch.nn.Linear):
    """A Linear holding bf16 weights: its input is rounded to bf16, the product accumulated in fp32 by the
    bf16 kernels, and the result returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _selected(name: str, which: str) -> bool:
    return which == "all" or (which == "mlp" and ".mlp." in f".{name}")


def cast_linears(model: torch.nn.Module, which: str) -> list[str]:
    """Turn the ``which`` linears ('mlp' or 'all') of ``model`` into BF16Linear in place; their names."""
    if which == "none":
        return []
    names = []
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and _selected(name, which):
            m.to(torch.bfloat16)
            m.__class__ = BF16Linear  # same parameters and state-dict keys, another forward
            names.append(name)
    if not names:
        raise ConfigError(f"bf16_linears {which!r}: this model has no such linear layers (none under an 'mlp' module)")
    return names
