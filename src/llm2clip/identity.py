"""Caption-encoder identities: the fields that must match for two embeddings to be the same function of a caption
(model, weights, pooling, template, ...), and the numerics (compute dtype, batching, bf16 linears) that change an
embedding only slightly (bf16 against fp32: minimum cosine 0.989 on SmolLM2, benchmarks/CAPTION_ENCODER.md)."""

from __future__ import annotations

NUMERICS = "numerics"
# Numerics recorded only when not at their default (text.config.LLMEncoderConfig): an identity that records
# numerics without one of these was computed at the default.
NUMERICS_DEFAULTS = {"bf16_linears": "none"}


def without_numerics(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if k != NUMERICS}


def numerics_diff(a: dict, b: dict) -> list[str]:
    """Numerics fields both identities record, with different values (identities from before numerics were
    recorded have none, and agree with any)."""
    na, nb = a.get(NUMERICS) or {}, b.get(NUMERICS) or {}
    if na and nb:
        na, nb = {**NUMERICS_DEFAULTS, **na}, {**NUMERICS_DEFAULTS, **nb}
    return sorted(k for k in set(na) & set(nb) if na[k] != nb[k])


def numerics_note(have: dict, got: dict, have_name: str, got_name: str) -> str:
    """One line naming the numerics that differ, or '' when none does."""
    diff = numerics_diff(have, got)
    if not diff:
        return ""
    nh, ng = {**NUMERICS_DEFAULTS, **have[NUMERICS]}, {**NUMERICS_DEFAULTS, **got[NUMERICS]}
    pairs = ", ".join(f"{k}: {have_name} {nh[k]!r}, {got_name} {ng[k]!r}" for k in diff)
    return f"computed with other numerics ({pairs}): the embeddings differ slightly"
