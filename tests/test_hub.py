"""Hub-style models: save_pretrained / from_pretrained / push_to_hub (no network: a fake HfApi and a
hand-made hub cache), the model card, hub ids in llm2clip.load, and the named configs of the factory."""

import json
import shutil

import pytest
import torch
from stage2_helpers import run_cfg

import llm2clip
from llm2clip import hub
from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder
from llm2clip.errors import ConfigError
from llm2clip.factory import config_of
from llm2clip.model import LLM2CLIP, ModelConfig, TextAdapter, write_model_card

SMALL = {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2}
BOW = {"kind": "bow", "dim": 24}


def _model(seed: int = 0) -> LLM2CLIP:
    torch.manual_seed(seed)
    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=24))
    return LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=16, text={"kind": "adapter", "depth": 1}), text_dim=24,
                    text_identity=enc.identity(), caption_encoder_config=BOW)


def _same(a: LLM2CLIP, b: LLM2CLIP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_writes_the_hub_files_and_from_pretrained_reads_them(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors",
                                                            "llm2clip_model.json", "README.md"}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["LLM2CLIP"] and cfg["caption_embedding_dim"] == 24
    back = LLM2CLIP.from_pretrained(tmp_path / "m")
    assert _same(m, back) and back.text_identity == m.text_identity
    loaded = llm2clip.load(tmp_path / "m", device="cpu")
    img = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded.embed_pixels(img), m.eval().encode_image(img), atol=1e-6)
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: llm2clip" in card
    assert "## Caption encoder" in card and "`bow`" in card.lower() and "## Intended use and limits" in card


def test_folders_saved_before_save_pretrained_still_load(tmp_path):
    m = _model()
    m.save(tmp_path / "old")  # model.safetensors + llm2clip_model.json only
    assert _same(m, LLM2CLIP.from_pretrained(tmp_path / "old"))
    assert llm2clip.load(tmp_path / "old", device="cpu").embed_dim == 16


def test_the_card_is_rewritten_on_save_and_a_hand_written_readme_is_kept(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "m")
    m.training_record = {"steps": 123, "data": {"train": {"kind": "scenes", "count": 48}}}
    m.save_pretrained(tmp_path / "m")
    assert "123" in (tmp_path / "m" / "README.md").read_text()  # not the first card
    (tmp_path / "m" / "README.md").write_text("# mine\n")
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "# mine\n"
    with pytest.raises(ConfigError, match="not written by llm2clip"):
        write_model_card(tmp_path / "m")


def test_the_card_has_the_evaluation_table_when_a_results_file_is_beside_the_model(tmp_path):
    from llm2clip.eval.report import make_run

    run = tmp_path / "run"
    _model().save_pretrained(run / "model")
    assert "No evaluation recorded" in (run / "model" / "README.md").read_text()
    (run / "eval").mkdir()
    res = [{"benchmark": "scenes-dense", "task": "retrieval", "metrics": {"i2t_R@1": 0.4321, "t2i_R@1": 0.25}}]
    (run / "eval" / "results.json").write_text(json.dumps([make_run("tiny", res)]))
    write_model_card(run / "model")
    card = (run / "model" / "README.md").read_text()
    assert "I2T R@1 43.2, T2I R@1 25.0" in card and "# run" in card  # a run's model/ is titled by the run


def test_a_trained_model_has_its_card_from_what_the_run_recorded(tmp_path):
    from llm2clip.train.loop import fit

    last = fit(run_cfg(tmp_path / "run", train__steps=2), progress=False)
    folder = tmp_path / "run" / "model"
    assert (folder / "config.json").is_file()
    rec = json.loads((folder / "llm2clip_model.json").read_text())["training"]
    assert rec["steps"] == 2 and rec["final_loss"] == pytest.approx(last["loss"])
    assert str(tmp_path) not in json.dumps(rec)  # no paths of the machine in what may be published
    card = (folder / "README.md").read_text()
    assert "48 generated scenes" in card and "| steps | 2 |" in card
    assert "dense/t2i_R@1" in card  # the held-out retrieval at the end of training
    assert LLM2CLIP.from_pretrained(folder).training_record == rec


def test_push_to_hub_uploads_the_saved_folder_with_a_card_titled_by_the_repo(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin as mixin

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kw):
            seen["files"] = sorted(p.name for p in folder_path.iterdir())
            seen["card"] = (folder_path / "README.md").read_text()
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(mixin, "HfApi", FakeApi)
    url = _model().push_to_hub("me/tiny-llm2clip")
    assert url.endswith("/commit/1")
    assert seen["files"] == ["README.md", "config.json", "llm2clip_model.json", "model.safetensors"]
    assert "# me/tiny-llm2clip" in seen["card"] and "llm2clip.load('me/tiny-llm2clip')" in seen["card"]


def _fake_hub_cache(cache, repo_id: str, folder) -> None:
    """The layout snapshot_download leaves behind: refs/main -> snapshots/<commit>/files."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_load_takes_a_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    m = _model()
    m.save_pretrained(tmp_path / "m")
    _fake_hub_cache(tmp_path / "cache", "me/tiny", tmp_path / "m")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = llm2clip.load("me/tiny", device="cpu")
    assert loaded.model.text_identity == m.text_identity
    assert _same(m, LLM2CLIP.from_pretrained("me/tiny"))


def test_an_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"nobody/none: no local folder .* offline \(HF_HUB_OFFLINE=1\)"):
        llm2clip.load("nobody/none", device="cpu")
    with pytest.raises(ConfigError, match="model folder not found"):  # a path, not an id
        llm2clip.load(tmp_path / "missing" / "model", device="cpu")


# ------------------------------------------------------------------------------------- factory
def test_list_models_names_the_official_layouts_and_the_quickstart():
    names = llm2clip.list_models()
    for n in ("LLM2CLIP-EVA02-L-14-336", "LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336", "LLM2CLIP-Openai-L-14-336",
              "LLM2CLIP-Openai-L-14-224", "quickstart"):
        assert n in names
    with pytest.raises(ConfigError, match="unknown model"):
        llm2clip.create_model("ViT-nothing")


@pytest.mark.parametrize("name,in_dim,params", [("LLM2CLIP-EVA02-L-14-336", 4096, 273_769_728),
                                                ("LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336", 2048, 69_776_640)])
def test_official_adapters_have_the_papers_size_counted_on_the_meta_device(name, in_dim, params):
    cfg = config_of(name)
    t = cfg.text
    assert (t.in_dim, t.depth, t.expansion, cfg.embed_dim) == (in_dim, 4, 2, 1280)
    assert cfg.vision.name == "EVA02-L-14-336"
    with torch.device("meta"):  # no memory: the 8B adapter alone is 1.1 GB in fp32
        adapter = TextAdapter(t.in_dim, cfg.embed_dim, t.depth, t.expansion)
    assert sum(p.numel() for p in adapter.parameters()) == params  # 273.8M: the paper's 8B adapter


def test_openai_layouts_use_quick_gelu_towers():
    assert config_of("LLM2CLIP-Openai-L-14-336").vision.model_dump()["quick_gelu"] is True
    assert config_of("LLM2CLIP-Openai-L-14-224").vision.name == "ViT-L-14"


def test_create_model_builds_random_weights_or_loads_a_saved_model_of_that_architecture(tmp_path):
    m = llm2clip.create_model("quickstart")
    assert m.text.in_dim == 576 and m.config.embed_dim == 256 and m.visual.image_size == 32
    with torch.no_grad():
        m.head.weight.add_(1.0)
    m.save_pretrained(tmp_path / "qs")
    again = llm2clip.create_model("QuickStart", pretrained=tmp_path / "qs")
    assert _same(m, again)
    _model().save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="not a quickstart model"):
        llm2clip.create_model("quickstart", pretrained=tmp_path / "other")


def test_hub_id_shapes():
    assert hub.looks_like_hub_id("microsoft/LLM2CLIP-EVA02-L-14-336")
    for not_id in ("runs/x/model", "./a/b", "/a/b", "~/a", "a", "a/../b"):
        assert not hub.looks_like_hub_id(not_id)
