"""Hugging Face Hub support: hub ids resolved to local folders, and the model cards (README.md) of
saved stage-2 models and stage-1 caption encoders.

A card is written from what the folder records (its manifest, the training record the trainer puts in
it, an evaluation results file beside it), never from numbers typed in here; ``llm2clip.model.write_model_card``
rewrites a model's, e.g. after ``llm2clip eval``. Nothing here imports torch or the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ConfigError
from .fileio import markdown_table, write_text_atomic

PAPER = "https://arxiv.org/abs/2411.04997"
CARD = "README.md"
CARD_MARK = "<!-- written by llm2clip; rewritten on save -->"  # only such cards are replaced
# where a model folder's evaluation results (``llm2clip eval``'s results.json) may sit
EVAL_RESULTS = ("eval_results.json", "eval/results.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------- hub ids
def looks_like_hub_id(name: str) -> bool:
    """``owner/name``, not a path that starts with '.', '/' or '~'."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_model_dir(name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
                      token: str | bool | None = None, force_download: bool = False,
                      local_files_only: bool = False) -> Path:
    """A local folder as given, else a hub id downloaded (or found in the cache) with snapshot_download.

    Offline (HF_HUB_OFFLINE=1) an id the cache lacks, an unknown repo, or no network, is a ConfigError
    that says which."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise ConfigError(f"{name}: model folder not found")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      force_download=force_download, local_files_only=local_files_only))
    except RepositoryNotFoundError:
        raise ConfigError(f"{name}: no local folder, and no model repository of that id on the Hugging Face Hub "
                          "(or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = ("the Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE or local_files_only
               else "the Hub cannot be reached")
        raise ConfigError(f"{name}: no local folder of that name, and as a Hugging Face Hub id it is not in the "
                          f"cache while {why}") from None
    except (HfHubHTTPError, OSError) as err:
        raise ConfigError(f"{name}: no local folder, and the Hugging Face Hub download failed: {err}") from None


# ----------------------------------------------------------------------------------- card parts
def _front_matter(tags: list[str], pipeline_tag: str | None, base_model: str | None = None) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="llm2clip", tags=["llm2clip", *tags], pipeline_tag=pipeline_tag)
    if base_model and looks_like_hub_id(base_model):  # the hub links only ids
        data.base_model = base_model
    return f"---\n{data.to_yaml()}\n---\n{CARD_MARK}\n"


def _kv_table(d: dict | None, what: str = "field") -> str:
    if not d:
        return "_not recorded_\n"
    rows = [[f"`{k}`", f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`"] for k, v in d.items()]
    return markdown_table([what, "value"], rows) + "\n"


def _fmt(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _source(src: dict | None) -> str:
    if not src:
        return "none"
    kind = src.get("kind", "?")
    details = {"scenes": lambda s: f"{s.get('count')} generated scenes (offset {s.get('offset', 0)})",
               "manifest": lambda s: f"manifest `{Path(str(s.get('path'))).name}`",
               "fashion_mnist": lambda s: f"Fashion-MNIST {s.get('split')} ({s.get('count') or 'all'} images)",
               "webdataset": lambda s: "webdataset shards"}
    return details.get(kind, lambda s: kind)(src)


def folder_title(folder: str | Path) -> str:
    """A card's title: the folder's name, or the run's for ``run_dir/model``."""
    full = Path(folder).resolve()
    return full.parent.name if full.name == "model" else full.name


def find_eval_results(folder: Path) -> Path | None:
    """An evaluation results file of the model in ``folder`` (also ``run_dir/eval/results.json`` for
    ``run_dir/model``), or None."""
    places = [folder / p for p in EVAL_RESULTS]
    if folder.name == "model":
        places.append(folder.parent / "eval" / "results.json")
    return next((p for p in places if p.is_file()), None)


# metrics shown per benchmark result, in %: retrieval, zero-shot and CRA keys of llm2clip eval's results
_SHOWN = (("i2t_R@1", "I2T R@1"), ("t2i_R@1", "T2I R@1"), ("i2t_R@5", "I2T R@5"), ("t2i_R@5", "T2I R@5"),
          ("top1", "top-1"), ("top5", "top-5"), ("R@1", "R@1"))


def eval_rows(results: Path) -> list[list[str]]:
    """(model, benchmark, task, figures) rows of an ``llm2clip eval`` results.json (a run or a list of runs)."""
    runs = json.loads(results.read_text(encoding="utf-8"))
    rows = []
    for run in [runs] if isinstance(runs, dict) else runs:
        for r in run.get("results", []):
            m = r.get("metrics") or {}
            shown = [(label, m[k]) for k, label in _SHOWN if isinstance(m.get(k), (int, float))]
            figures = ", ".join(f"{label} {100 * v:.1f}" for label, v in shown)
            rows.append([str((run.get("model") or {}).get("name", "?")), str(r.get("benchmark")), str(r.get("task")),
                         figures])
    return rows


def _eval_section(results: Path | None, training: dict) -> str:
    if results is not None:
        try:
            table = markdown_table(["model", "benchmark", "task", "%"], eval_rows(results))
        except (OSError, ValueError, TypeError, AttributeError) as err:  # the card is still written
            table = f"_{results.name} could not be read: {err}_"
        return f"From `{results.name}` (`llm2clip eval`), in %.\n\n{table}\n"
    ev = training.get("final_eval")
    if ev:
        rows = [[k, _fmt(v)] for k, v in ev.items()]
        return ("No evaluation results file beside the model; the held-out retrieval measured at the end of "
                f"training ({_fmt(ev.get('n', '?'))} images):\n\n{markdown_table(['metric', 'value'], rows)}\n")
    return ("_No evaluation recorded: run `llm2clip eval` on this folder, then "
            "`llm2clip.model.write_model_card(folder)`._\n")


# ------------------------------------------------------------------------------------ the cards
def model_card(mf: dict, eval_results: str | Path | None = None, title: str = "llm2clip model") -> str:
    """The README.md text of a saved stage-2 model from its manifest (``llm2clip_model.json``)."""
    cfg, identity, enc = mf.get("config") or {}, mf.get("text_identity"), mf.get("caption_encoder") or {}
    training = mf.get("training") or {}
    vision, text = cfg.get("vision") or {}, cfg.get("text") or {}
    tower = vision.get("name") or (f"small ViT (patch {vision.get('patch_size')}, width {vision.get('width')}, "
                                   f"{vision.get('layers')} layers)" if vision.get("kind") == "small_vit"
                                   else vision.get("path") or vision.get("kind"))
    if text.get("kind", "adapter") == "adapter":
        text_side = (f"text adapter over stored caption embeddings ({mf.get('text_dim')}-d in, depth "
                     f"{text.get('depth')}, {cfg.get('embed_dim')}-d out); the LLM runs only to embed captions")
    else:
        text_side = f"CLIP text transformer ({text.get('layers')} layers, width {text.get('width')}; baseline)"
    base = (identity or {}).get("base_model")
    parts = [
        _front_matter(["clip", "vision", "llm2clip-stage2"], "zero-shot-image-classification", base),
        f"# {title}\n",
        f"An [LLM2CLIP]({PAPER}) model saved by llm2clip: a vision tower (`{tower}`, {vision.get('kind')}) with a "
        f"new head, and a {text_side}. Loss: {cfg.get('loss', 'clip')}.\n",
        "```python\nimport llm2clip\n"
        f"m = llm2clip.load({str(title)!r})  # a local folder or a Hugging Face Hub id\n"
        "img = m.encode_image([\"photo.jpg\"]); txt = m.encode_text([\"a long, dense description ...\"])\n"
        "m.similarity(img, txt)\n```\n",
        "## Caption encoder\n",
        "The adapter reads embeddings of one caption encoder only; `llm2clip.load` checks this identity and "
        "refuses another.\n\n" + _kv_table(identity) if text.get("kind", "adapter") == "adapter"
        else "This model has its own text tower; it needs no caption encoder.\n",
    ]
    if enc:
        src = enc.get("model") or enc.get("name")
        if src and not looks_like_hub_id(str(src)):
            src = Path(str(src)).name  # a local folder: its name, not this machine's path
        parts.append(f"`llm2clip.load` rebuilds it from the recorded config (kind `{enc.get('kind')}`"
                     + (f", model `{src}`" if src else "") + ").\n")
    parts += ["## Training\n", _training_section(training), "## Evaluation\n",
              _eval_section(Path(eval_results) if eval_results else None, training),
              "## Intended use and limits\n",
              "- Research on image-text retrieval and zero-shot classification with LLM caption encoders.\n"
              "- Embeddings are comparable only with others from this model and its caption encoder; the "
              "model knows only the data above, and scores on other data are not measured here.\n"
              "- Not evaluated for fairness, safety or any decision about people; a small or synthetic "
              "training set (see above) makes a demonstration model, not a general one.\n"]
    return "\n".join(parts)


def _training_section(t: dict) -> str:
    if not t:
        return "_Not recorded (a converted checkpoint, or saved without a training record)._\n"
    data = t.get("data") or {}
    rows = [["training data", _source(data.get("train"))], ["held-out data", _source(data.get("val"))],
            ["caption kinds", ", ".join(f"{k} {v:g}" for k, v in (data.get("caption_kinds") or {}).items())],
            ["caption embeddings", t.get("features") or "?"],
            ["steps", _fmt(t.get("steps"))], ["global batch", _fmt(t.get("batch_size"))],
            ["learning rate", _fmt(t.get("lr"))], ["precision", t.get("precision", "?")],
            ["processes", _fmt(t.get("world_size", 1))], ["seed", _fmt(t.get("seed"))]]
    if t.get("final_loss") is not None:
        rows.append(["final loss", _fmt(t["final_loss"])])
    if t.get("skipped_images"):
        rows.append(["unreadable images skipped", _fmt(t["skipped_images"])])
    if t.get("truncated_captions"):
        rows.append(["captions truncated by the caption encoder", _fmt(t["truncated_captions"])])
    return markdown_table(["", ""], rows) + "\n"


def write_card(folder: str | Path, text: str) -> Path:
    """``folder/README.md`` := text, unless a README not written by llm2clip is there (ConfigError)."""
    card = Path(folder) / CARD
    if card.is_file() and CARD_MARK not in card.read_text(encoding="utf-8"):
        raise ConfigError(f"{card}: a README not written by llm2clip is there; not replaced")
    return write_text_atomic(card, text)


def encoder_card(mf: dict, summary: dict | None = None, config: dict | None = None,
                 title: str = "caption encoder") -> str:
    """The README.md text of a stage-1 caption-encoder folder from its manifest (``llm2clip_encoder.json``)."""
    identity, settings, config = mf.get("identity") or {}, mf.get("encoder") or {}, config or {}
    base = identity.get("base_model")
    optim, lora = config.get("optim") or {}, config.get("lora") or {}
    rows = [["objective", config.get("objective", "?")], ["steps", _fmt(optim.get("steps"))],
            ["learning rate", _fmt(optim.get("lr"))], ["LoRA rank / top layers",
                                                        f"{lora.get('r', '?')} / {lora.get('top_layers') or 'all'}"],
            ["data", ", ".join(x for x in [
                "CuPL training classes" if (config.get("data") or {}).get("cupl_train") else "",
                *(Path(p).name for p in (config.get("data") or {}).get("groups", []))] if x) or "?"]]
    summary = dict(summary or {})
    if summary.get("train_s") is not None:
        rows.append(["training time (s)", _fmt(summary.pop("train_s"))])
    results = {k: v for k, v in summary.items() if k != "step" and isinstance(v, (int, float))}
    name = base if base is None or looks_like_hub_id(str(base)) else Path(str(base)).name  # no local path
    parts = [
        _front_matter(["caption-encoder", "llm2clip-stage1"], "feature-extraction", base),
        f"# {title}\n",
        f"Stage 1 of [LLM2CLIP]({PAPER}): `{name}` fine-tuned (LoRA, merged) so that its pooled hidden states "
        "tell captions apart. Stage-2 models trained on its embeddings pin the identity below.\n",
        "```python\nfrom llm2clip.text.encoder import CaptionEncoder\n"
        "enc = CaptionEncoder.from_pretrained(\"path/to/this/folder\")\nemb = enc.encode([\"a caption\"])\n```\n",
        "## Identity\n", _kv_table(identity), "## Settings\n", _kv_table(settings, "setting"),
        "## Training\n", markdown_table(["", ""], rows) + "\n",
        "## Evaluation (end of training)\n",
        (markdown_table(["metric", "value"], [[k, _fmt(v)] for k, v in results.items()]) + "\n") if results
        else "_No evaluation recorded._\n",
        "## Intended use and limits\n",
        "- A caption encoder for LLM2CLIP stage 2 (its embeddings feed a stage-2 text adapter), and caption "
        "retrieval research.\n- Not a chat model: merging the LoRA changed the LLM's weights, and generation was "
        "not evaluated. Inherits the base model's licence and limits.\n"]
    return "\n".join(parts)
