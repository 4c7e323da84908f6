"""Retrieval and zero-shot metrics against CLIP_benchmark's definitions, brute force and loops.

CLIP_benchmark (installed with --no-deps) is the reference: its retrieval module imports only
torch and tqdm, so its own ``evaluate`` runs here on a fake model. Its classification module
imports scikit-learn at the top for functions we do not use; the test puts a stub ``sklearn``
in ``sys.modules`` while importing it, so that ``zero_shot_classifier`` is the package's own code.
Its ``accuracy`` breaks on numpy >= 2.4, so the test restates it (top-k of the logits, as there).
"""

import hashlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from llm2clip.errors import InputError
from llm2clip.eval import retrieval as R
from llm2clip.eval import zeroshot as Z


@pytest.fixture(scope="module")
def zr():
    return pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


def _pool(n_images=60, dim=16, counts=None, seed=0, shuffle=True, signal=0.7):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 8, (n_images,), generator=g) if counts is None else torch.as_tensor(counts)
    ci = torch.repeat_interleave(torch.arange(n_images), counts)
    if shuffle:
        ci = ci[torch.randperm(len(ci), generator=g)]
    img = torch.randn(n_images, dim, generator=g)
    txt = torch.randn(len(ci), dim, generator=g) + signal * img[ci]
    return img, txt, ci


class _IndexModel:
    """A CLIP-like model whose 'images' and 'tokens' are row indices into fixed features."""

    def __init__(self, img, txt):
        self.img, self.txt = img, txt

    def encode_image(self, x):
        return self.img[x]

    def encode_text(self, tokens):
        return self.txt[tokens]


def _clip_benchmark_evaluate(zr, img, txt, ci, ks, batch_size=16):
    """CLIP_benchmark's own ``evaluate``: images in order, each with its captions (a list of texts)."""
    caps_of = [[str(c) for c in (ci == i).nonzero().flatten().tolist()] for i in range(len(img))]
    batches = [(torch.arange(s, min(s + batch_size, len(img))), caps_of[s: s + batch_size])
               for s in range(0, len(img), batch_size)]
    tokenizer = lambda texts: torch.tensor([int(t) for t in texts])
    return zr.evaluate(_IndexModel(img, txt), batches, tokenizer, "cpu", amp=False, recall_k_list=list(ks))


@pytest.mark.parametrize("counts", [None, [5] * 40, [5] * 35 + [6, 7, 6, 5, 5]])
def test_agrees_with_clip_benchmark_evaluate(zr, counts):
    img, txt, ci = _pool(n_images=40 if counts else 60, counts=counts)
    ks = (1, 5, 10)
    ref = _clip_benchmark_evaluate(zr, img, txt, ci, ks)
    ours = R.retrieval_metrics(img, txt, ci, ks)
    for k in ks:  # CLIP_benchmark: text_retrieval = I2T, image_retrieval = T2I
        assert ours[f"i2t_R@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"t2i_R@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-6)
    assert ours["images"] == len(img) and ours["captions"] == len(txt)


def test_per_query_hits_equal_clip_benchmark_recall_at_k(zr):
    img, txt, ci = _pool(n_images=80, seed=3)  # unequal counts, captions in shuffled order
    ranks = R.retrieval_ranks(img, txt, ci)
    scores = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(ci)), ci] = True
    for k in (1, 3, 5, 10):
        t2i_ref = zr.batchify(zr.recall_at_k, scores, pos, 32, "cpu", k=k) > 0
        i2t_ref = zr.batchify(zr.recall_at_k, scores.T, pos.T, 32, "cpu", k=k) > 0
        assert torch.equal(ranks.t2i < k, t2i_ref)
        assert torch.equal(ranks.i2t < k, i2t_ref)


def _brute_force(img, txt, ci, normalize=True):
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    s = txt @ img.T
    t2i = torch.tensor([int((s[c] >= s[c, ci[c]]).sum()) - 1 for c in range(len(ci))])
    i2t = []
    for i in range(len(img)):
        own = ci == i
        if not own.any():
            i2t.append(-1)
            continue
        best = s[own, i].max()
        i2t.append(int((s[~own, i] >= best).sum()))
    return torch.tensor(i2t), t2i


@pytest.mark.parametrize("normalize", [True, False])
def test_ranks_equal_brute_force_with_uncaptioned_images(normalize):
    img, txt, ci = _pool(n_images=50, seed=5)
    ci[ci == 7] = 8  # image 7 keeps no caption: a distractor for T2I, left out of I2T
    i2t_ref, t2i_ref = _brute_force(img, txt, ci, normalize)
    ranks = R.retrieval_ranks(img, txt, ci, normalize=normalize)
    assert torch.equal(ranks.i2t, i2t_ref) and torch.equal(ranks.t2i, t2i_ref)
    m = R.retrieval_metrics(img, txt, ci, normalize=normalize)
    assert m["images_without_captions"] == 1
    assert m["i2t_R@5"] == pytest.approx(float((i2t_ref[i2t_ref >= 0] < 5).double().mean()))


@pytest.mark.parametrize("chunk", [1, 3, 17, 64])
def test_chunked_equals_full(chunk):
    img, txt, ci = _pool(n_images=70, seed=7)
    full = R.retrieval_ranks(img, txt, ci, chunk_size=len(txt))
    part = R.retrieval_ranks(img, txt, ci, chunk_size=chunk)
    assert torch.equal(full.i2t, part.i2t) and torch.equal(full.t2i, part.t2i)
    tiny = R.retrieval_ranks(img, txt, ci, max_chunk_bytes=1)  # one caption per block
    assert torch.equal(full.i2t, tiny.i2t) and torch.equal(full.t2i, tiny.t2i)


def test_int16_count_blocks_are_exact(monkeypatch):
    img, txt, ci = _pool(n_images=45, seed=11)
    ref = R.retrieval_ranks(img, txt, ci, chunk_size=len(txt))
    monkeypatch.setattr(R, "_I16", 7)  # blocks of 7 images and at most 7 captions per chunk
    got = R.retrieval_ranks(img, txt, ci)
    assert torch.equal(ref.i2t, got.i2t) and torch.equal(ref.t2i, got.t2i)


def test_memory_is_bounded_by_the_chunk_budget():
    # 1M captions x 100k images: each block of scores stays within the budget.
    rows = R.rows_per_chunk(100_000, 1280, R.DEFAULT_CHUNK_BYTES)
    assert 1 <= rows and rows * 100_000 * 5 <= R.DEFAULT_CHUNK_BYTES
    assert R.rows_per_chunk(10, 4, 1 << 40) <= R._I16


def _looped_one_to_one(img, txt, ks):
    """The official retrieval_global's definition (caption i belongs to image i), query by query."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = sum(j in torch.topk(txt[j] @ img.T, k).indices for j in range(len(txt))) / len(txt)
        out[f"i2t_R@{k}"] = sum(j in torch.topk(img[j] @ txt.T, k).indices for j in range(len(img))) / len(img)
    return out


def test_one_to_one_equals_official_looped_definition():
    img, txt, ci = _pool(n_images=64, counts=[1] * 64, shuffle=False, seed=2, signal=0.4)
    ours = R.retrieval_metrics(img, txt, ci, ks=(1, 5, 10, 25, 50))
    ref = _looped_one_to_one(img, txt, (1, 5, 10, 25, 50))
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v)


def test_unequal_caption_counts_never_shift_alignment():
    # Features that match exactly: every query must hit at R@1 however the counts vary.
    g = torch.Generator().manual_seed(1)
    img = torch.randn(30, 32, generator=g)
    ci = torch.repeat_interleave(torch.arange(30), torch.tensor([5, 6, 7, 1] * 7 + [5, 5]))
    ci = ci[torch.randperm(len(ci), generator=g)]
    txt = img[ci] + 1e-3 * torch.randn(len(ci), 32, generator=g)
    m = R.retrieval_metrics(img, txt, ci, ks=(1,))
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0


def test_caption_index_from_lists():
    caps, idx = R.caption_index_from_lists([["a", "b"], ["c"], [], ["d", "e", "f"]])
    assert caps == ["a", "b", "c", "d", "e", "f"] and idx.tolist() == [0, 0, 1, 3, 3, 3]
    with pytest.raises(InputError, match="image 1"):
        R.caption_index_from_lists([["a"], "b"])


def test_ties_count_against_the_query():
    img = torch.ones(10, 4)
    txt = torch.ones(20, 4)
    ci = torch.arange(10).repeat(2)
    m = R.retrieval_metrics(img, txt, ci, ks=(1, 10))
    assert m["t2i_R@1"] == 0.0 and m["i2t_R@1"] == 0.0  # a constant model earns nothing
    assert m["t2i_R@10"] == 1.0  # K covering the whole pool always hits


def test_names_say_the_direction():
    img, txt, ci = _pool(n_images=12)
    m = R.retrieval_metrics(img, txt, ci, ks=(1, 2))
    assert {"i2t_R@1", "i2t_R@2", "t2i_R@1", "t2i_R@2"} <= set(m)
    curves = R.retrieval_ranks(img, txt, ci).curves((1, 100))
    assert curves["k"] == [1, 100] and curves["i2t"][1] == 1.0 and curves["t2i"][1] == 1.0


@pytest.mark.parametrize("bad, match", [
    (lambda i, t, c: (i, t, c[:-1]), "entries for"),
    (lambda i, t, c: (i, t, torch.cat([c[:-1], torch.tensor([99])])), "points to image 99"),
    (lambda i, t, c: (i, t, c.float()), "integer"),
    (lambda i, t, c: (i[:, :3], t, c), "-d"),
    (lambda i, t, c: (i, t[0], c), r"\[N, D\]"),
    (lambda i, t, c: (i, torch.where(torch.arange(len(t))[:, None] == 2, float("nan"), t), c), "NaN"),
    (lambda i, t, c: (i.long(), t, c), "floating"),
])
def test_bad_inputs_are_clear_errors(bad, match):
    img, txt, ci = _pool(n_images=10)
    with pytest.raises(InputError, match=match):
        R.retrieval_metrics(*bad(img, txt, ci))


def test_bad_ks():
    img, txt, ci = _pool(n_images=10)
    for ks in ([], [0], [1.5]):
        with pytest.raises(InputError, match="K values"):
            R.retrieval_metrics(img, txt, ci, ks=ks)


# --- zero-shot classification -----------------------------------------------------------------


@pytest.fixture(scope="module")
def zc():
    stubbed = []
    if "sklearn" not in sys.modules:  # imported at the top of the module for unrelated functions
        stub = types.ModuleType("sklearn")
        stub.metrics = types.ModuleType("sklearn.metrics")
        stub.metrics.classification_report = stub.metrics.balanced_accuracy_score = None
        sys.modules["sklearn"], sys.modules["sklearn.metrics"] = stub, stub.metrics
        stubbed = ["sklearn", "sklearn.metrics"]
    try:
        zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    finally:
        for name in stubbed:  # never leave the stub for other tests
            sys.modules.pop(name, None)
    return zc


class _HashTextModel:
    """Text -> a fixed random vector per distinct string (any text path will do for the definition)."""

    def __init__(self, dim=24):
        self.dim, self.cache = dim, {}

    def _vec(self, t):
        if t not in self.cache:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            self.cache[t] = torch.randn(self.dim, generator=g)
        return self.cache[t]

    def encode_text(self, texts):
        return torch.stack([self._vec(t) for t in texts])


@pytest.mark.parametrize("kind", ["templates", "dict"])
def test_classifier_and_accuracy_equal_clip_benchmark(zc, kind):
    names = ["cat", "dog", "tiger shark", "goldfish", "car", "tree", "house"]
    prompts = (["a photo of a {c}.", "a drawing of the {c}.", "itap of a {c}."] if kind == "templates"
               else {c: [f"{c} description {j}" for j in range(1 + i % 3)] for i, c in enumerate(names)})
    model = _HashTextModel()
    ours = Z.build_classifier(model.encode_text, names, prompts, batch_size=4)
    class tok(list):  # CLIP_benchmark tokenizes and moves to a device; the fake model takes strings
        def to(self, device):
            return self

    ref = zc.zero_shot_classifier(model, tok, names, prompts, "cpu", amp=False)  # [D, C]
    assert torch.allclose(ours, ref.T, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(names), (200,), generator=g)
    feats = torch.randn(200, 24, generator=g) + 0.8 * ours[labels]
    acc = Z.zeroshot_accuracy(feats, ours, labels, ks=(1, 5))
    logits = 100.0 * F.normalize(feats, dim=-1) @ ref
    # zc.accuracy itself fails on numpy >= 2.4 (float() of a 1-element array); this is its definition.
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    top1, top5 = (correct[:k].reshape(-1).float().sum().item() / len(labels) for k in (1, 5))
    assert acc["top1"] == pytest.approx(top1) and acc["top5"] == pytest.approx(top5)
    assert acc["images"] == 200 and acc["classes"] == len(names)


def test_prompt_errors():
    model = _HashTextModel()
    with pytest.raises(InputError, match="without"):
        Z.build_classifier(model.encode_text, ["cat"], ["a photo"])
    with pytest.raises(InputError, match="no prompts for 1"):
        Z.build_classifier(model.encode_text, ["cat", "dog"], {"cat": ["a cat"]})
    with pytest.raises(InputError, match="labels"):
        Z.zeroshot_accuracy(torch.randn(3, 24), torch.randn(2, 24), [0, 1, 2])


def test_packaged_prompt_files():
    names = Z.load_classnames("imagenet1k")
    assert len(names) == 1000 and len(Z.load_templates("imagenet1k")) == 80
    cupl = Z.load_cupl("imagenet1k")
    assert all(cupl.get(c) for c in names)  # CuPL covers every ImageNet name (998 distinct)
    prompts, label = Z.resolve_prompts("cupl")
    assert prompts is not None and "CuPL" in label
    with pytest.raises(InputError):
        Z.resolve_prompts("nonsense")


def test_half_precision_features_are_scored_in_float32():
    img, txt, ci = _pool(n_images=40, seed=9)
    img16, txt16 = img.bfloat16(), txt.bfloat16()
    got = R.retrieval_ranks(img16, txt16, ci, device="cpu")
    ref = R.retrieval_ranks(img16.float(), txt16.float(), ci)
    assert torch.equal(got.i2t, ref.i2t) and torch.equal(got.t2i, ref.t2i)
