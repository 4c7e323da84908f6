"""Prompt layout of a caption: [BOS] template-head [instruction; ] caption template-tail.

The template is explicit config (never inferred from a model name, docs/METHOD.md 7.3). Each part
is tokenized on its own, so the caption's token span is known exactly: the pooled tokens are
the caption's, plus the template's closing tokens when ``pool_template_suffix`` is set (the
released LLM2CLIP encoders pool ``caption + <|eot_id|>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

LLAMA3_USER_HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_USER_TAIL = "<|eot_id|>"
_MARK = "\u2063CAPTION\u2063"


@dataclass(frozen=True)
class PromptFormat:
    prefix_ids: tuple[int, ...]  # BOS, template head and instruction: attended, not pooled
    suffix_ids: tuple[int, ...]  # template tail
    prefix_text: str
    suffix_text: str
    caption_lead: str = ""  # the space after '<instruction>;' travels with the caption, as in one string


def _template_text(template: str, tokenizer) -> tuple[str, str]:
    if template == "none":
        return "", ""
    if template == "llama3":
        return LLAMA3_USER_HEAD, LLAMA3_USER_TAIL
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template: 'tokenizer' but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=False
        )
        if text.count(_MARK) != 1:
            raise ConfigError("template: the tokenizer's chat template does not place the user text once")
        head, tail = text.split(_MARK)
        return head, tail
    raise ConfigError(f"template: unknown template {template!r} (none, tokenizer, llama3)")


def _bos_id(tokenizer) -> int | None:
    """The BOS id if this tokenizer adds one to plain text (Llama-3 does, SmolLM2 does not)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id:
        return ids[0]
    return None


def prompt_format(tokenizer, template: str, instruction: str | None) -> PromptFormat:
    head, tail = _template_text(template, tokenizer)
    prefix_text = head + (f"{instruction.strip()};" if instruction else "")
    lead = " " if instruction else ""
    prefix = list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"]) if prefix_text else []
    bos = _bos_id(tokenizer)
    if bos is not None and (not prefix or prefix[0] != bos):
        prefix.insert(0, bos)
    suffix = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    return PromptFormat(tuple(prefix), tuple(suffix), prefix_text, tail, lead)
