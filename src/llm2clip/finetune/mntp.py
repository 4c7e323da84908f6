"""MNTP: masked next-token prediction on a bidirectional LLM (LLM2Vec, docs/METHOD.md 1.2).

20 % of the non-special tokens are selected; of those 80 % become the mask token, 10 % a random
token, 10 % stay. The original token at position i is predicted from the output at position
i-1, so the causal LM head is reused as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..text.attention import attention_inputs


def mask_token_id(tokenizer, mask_token: str | None = "_") -> int:
    """The tokenizer's own mask token, else ``mask_token`` (``_`` as LLM2Vec's 'blank')."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"mntp.mask_token: {mask_token!r} is {len(ids)} tokens for this tokenizer; "
                          "pick a single token")
    return int(ids[0])


def pack_blocks(tokenizer, docs: Sequence[str], block_size: int) -> list[list[int]]:
    """Tokenize, concatenate (EOS between documents) and cut into blocks of ``block_size``."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    blocks = [stream[s : s + block_size] for s in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks and stream:
        blocks = [stream]
    return blocks


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, probability: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked inputs, labels): labels are -100 except at the selected positions."""
    labels = input_ids.clone()
    prob = torch.full(input_ids.shape, probability)
    prob.masked_fill_(special, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = -100
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return inputs, labels


def mask_id_and_blocks(tokenizer, docs: Sequence[str], settings) -> tuple[int, list[list[int]]]:
    return mask_token_id(tokenizer, settings.mask_token), pack_blocks(tokenizer, docs, settings.block_size)


def special_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    return torch.tensor([[int(t) in ids for t in row] for row in input_ids.tolist()], dtype=torch.bool)


def mntp_loss(lm, input_ids: torch.Tensor, labels: torch.Tensor, token_mask: torch.Tensor,
              bidirectional: bool = True) -> tuple[torch.Tensor, dict]:
    """Shifted cross-entropy over the selected positions, with masked-token accuracy."""
    dtype = next(lm.parameters()).dtype
    extra = attention_inputs(token_mask, bidirectional=bidirectional, dtype=dtype)
    logits = lm(input_ids=input_ids, use_cache=False, **extra).logits
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)
    sel = target != -100
    acc = (pred.argmax(-1)[sel] == target[sel]).float().mean().item() if sel.any() else float("nan")
    return loss, {"masked_accuracy": acc, "selected": int(sel.sum())}


@torch.no_grad()
def mntp_evaluate(lm, tokenizer, blocks: Sequence[Sequence[int]], mask_id: int, seed: int = 0,
                  probability: float = 0.2, batch_size: int = 8) -> dict:
    """Masked-token accuracy and perplexity on held-out blocks (fixed masking seed)."""
    g = torch.Generator().manual_seed(seed)
    device = next(lm.parameters()).device
    total_loss, total_n, correct = 0.0, 0, 0.0
    vocab = lm.get_output_embeddings().weight.shape[0]
    for s in range(0, len(blocks), batch_size):
        part = blocks[s : s + batch_size]
        T = max(len(b) for b in part)
        ids = torch.full((len(part), T), tokenizer.pad_token_id or 0, dtype=torch.long)
        tm = torch.zeros(len(part), T, dtype=torch.bool)
        for i, b in enumerate(part):
            ids[i, : len(b)] = torch.tensor(b)
            tm[i, : len(b)] = True
        special = special_mask(tokenizer, ids) | ~tm
        inputs, labels = mask_tokens(ids, special, mask_id, vocab, g, probability)  # masking drawn on the CPU
        loss, m = mntp_loss(lm, inputs.to(device), labels.to(device), tm.to(device))
        if m["selected"]:
            total_loss += loss.item() * m["selected"]
            correct += m["masked_accuracy"] * m["selected"]
            total_n += m["selected"]
    if not total_n:
        return {"masked_accuracy": float("nan"), "perplexity": float("nan"), "tokens": 0}
    return {"masked_accuracy": correct / total_n, "perplexity": math.exp(total_loss / total_n), "tokens": total_n}
