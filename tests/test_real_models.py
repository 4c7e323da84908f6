"""Behaviour on real text with the small real models of docs/ASSETS.md (SmolLM2, all-MiniLM-L6-v2)."""

import pytest
import torch

from llm2clip.data.captions import cupl_caption_set
from llm2clip.eval.cra import caption_retrieval_accuracy
from llm2clip.text import build_text_encoder
from llm2clip.text.specs import parse_encoder_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return build_text_encoder(parse_encoder_spec("smollm2:template=tokenizer"))


def test_smollm2_from_gguf_and_its_chat_template_tokens(smollm2):
    assert smollm2.dim == 576 and smollm2.model.config.num_hidden_layers == 30
    it = smollm2.tokenize(["A goldfish."])[0]
    toks = smollm2.tokenizer.convert_ids_to_tokens(it.ids)
    assert toks[:3] == ["<|im_start|>", "system", "Ċ"]
    assert toks[-8:] == ["<|im_start|>", "user", "Ċ", "A", "Ġgoldfish", ".", "<|im_end|>", "Ċ"]
    assert toks[it.pool_start : it.pool_end] == ["A", "Ġgoldfish", ".", "<|im_end|>", "Ċ"]


def test_smollm2_padding_invariance_on_real_text(smollm2):
    caps = ["A goldfish is a small, bright orange fish that is often kept as a pet.", "A tabby cat.",
            "The school bus is long and yellow with black letters on the side, and it carries children to school."]
    batched = smollm2.encode(caps, batch_size=3)
    alone = torch.cat([smollm2.encode([c]) for c in caps])
    torch.testing.assert_close(batched, alone, atol=2e-4, rtol=1e-4)


def test_real_encoders_rank_as_expected_on_cupl():
    cs = cupl_caption_set("heldout", 40, 5)
    scores = {}
    for spec in ("random", "minilm", "smollm2:bidirectional=false"):
        enc = build_text_encoder(parse_encoder_spec(spec))
        scores[spec] = caption_retrieval_accuracy(enc.encode(cs.captions), cs.groups)["R@1"]
    # MiniLM is a trained sentence encoder; raw SmolLM2 is far above chance and far below MiniLM
    assert scores["minilm"] > 0.85
    assert 0.1 < scores["smollm2:bidirectional=false"] < scores["minilm"] - 0.2
    assert scores["random"] < 0.1
