"""Tiny random decoder LLMs and a word-level tokenizer, built from configs (no downloads).

The tests use them, and so does the pipeline's smoke preset (the `tiny-random-llama` alias).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "a an the of and with on in under left right above below red green blue yellow black white small large "
    "big tiny circle square triangle star dog cat fish bird car bus tree house photo picture two three four "
    "is are has near next to at top bottom middle bright dark orange shiny striped spotted one many"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|end|>", "_"]
CHAT_TEMPLATE = "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"


def tiny_tokenizer(bos: bool = True, extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The byte-level symbols let families whose tokenizer class is rebuilt as byte-level BPE
    # (Qwen2 in transformers 5) still cover any text, one byte per token.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = list(dict.fromkeys([*WORDS, *extra_words]))
    symbols = [c for c in bytes_to_unicode().values() if c not in words]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + words + [".", ",", ";"] + symbols))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|user|>", "<|end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str = "llama", vocab_size: int = 128, **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    if family == "gemma2":
        base.update(head_dim=8, query_pre_attn_scalar=8, sliding_window=64)
    if family == "mistral":
        base.update(sliding_window=None)
    base.update(kw)
    return AutoConfig.for_model(family, **base)


def make_tiny_llm(path: Path, family: str = "llama", seed: int = 0, extra_words=(), **kw) -> Path:
    """Save a tiny random causal LM with the tiny tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(extra_words=extra_words)
    with torch.random.fork_rng(devices=[]):  # building it (maybe lazily, mid-run) must not move the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tok), **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # Keep the word-level tokenizer: without this, AutoTokenizer picks the family's own class.
    cfg_file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg))
    return Path(path)
