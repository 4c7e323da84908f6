"""Stage keys of `llm2clip run` hold only the settings that differ from their defaults (pipeline/plan.py), so a
changed default is invisible to them: the snapshot below fails until the change is looked at. If it alters what a
stage makes, bump plan.KEY_VERSION; then rewrite the snapshot: `python tests/test_pipeline_keys.py --write`."""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

import torch
from pydantic import BaseModel

from llm2clip.features.extract import EmbedConfig
from llm2clip.finetune.config import FinetuneConfig
from llm2clip.pipeline import plan
from llm2clip.pipeline.config import PipelineConfig
from llm2clip.pipeline.runner import Runner
from llm2clip.train.config import RunConfig

SNAPSHOT = Path(__file__).parent / "data" / "pipeline_defaults.json"
ROOTS = (PipelineConfig, FinetuneConfig, EmbedConfig, RunConfig)  # the run's config and what its stages validate


def _models(tp, seen: dict) -> None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        name = f"{tp.__module__}.{tp.__qualname__}"
        if name in seen:
            return
        seen[name] = tp
        for f in tp.model_fields.values():
            _models(f.annotation, seen)
        return
    for arg in typing.get_args(tp):
        _models(arg, seen)


def _default(field):
    if field.is_required():
        return "<required>"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def defaults() -> dict:
    seen: dict = {}
    for root in ROOTS:
        _models(root, seen)
    return {name: {k: _default(f) for k, f in sorted(tp.model_fields.items())} for name, tp in sorted(seen.items())}


def test_defaults_unchanged():
    recorded = json.loads(SNAPSHOT.read_text())
    now = defaults()
    changed = sorted(f"{m}.{k}: {recorded[m][k]!r} -> {now[m][k]!r}" for m in now.keys() & recorded.keys()
                     for k in now[m].keys() & recorded[m].keys() if now[m][k] != recorded[m][k])
    assert not changed, ("defaults changed; stage keys do not see them (" + "; ".join(changed) + "). If a stage's "
                         "output changes, bump KEY_VERSION in llm2clip/pipeline/plan.py; then rewrite the snapshot: "
                         "python tests/test_pipeline_keys.py --write")
    added = sorted({*(f"{m}.{k}" for m in now for k in now[m] if k not in recorded.get(m, {}))})
    assert not added, (f"new settings {added}: their defaults must keep what stages made before (else bump "
                       "KEY_VERSION); then rewrite the snapshot: python tests/test_pipeline_keys.py --write")


def _keys(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    r = Runner.__new__(Runner)
    r.run_dir = run_dir
    keys: dict[str, str] = {}
    for st in plan.build_stages(cfg):
        keys[st.name] = r._hash(st.key, {d: keys[d] for d in st.deps})
    return keys


def test_keys_ignore_defaults_but_not_settings(tmp_path):
    cfg = plan.load_pipeline_config("smoke")
    base = _keys(cfg, tmp_path)
    # a setting spelled out at its default (as a field a newer version adds at its default): the same keys
    d = cfg.model_dump(mode="json", exclude_unset=True)
    d["stage2"].setdefault("train", {})["tf32"] = RunConfig.model_fields["train"].default_factory().tf32
    assert _keys(PipelineConfig.model_validate(d), tmp_path) == base
    # a real change: that stage and what depends on it get new keys, nothing else
    other = cfg.model_copy(deep=True)
    other.stage2.optim.lr = cfg.stage2.optim.lr * 2
    changed = {k for k, v in _keys(other, tmp_path).items() if v != base[k]}
    assert changed and all(k.startswith("train/") or k == "eval" for k in changed), changed


def test_union_kinds_stay_apart():
    from llm2clip.pipeline.config import EncoderTeacher

    sentence = EncoderTeacher.model_validate({"encoder": {"kind": "sentence"}})
    random = EncoderTeacher.model_validate({"encoder": {"kind": "random"}})
    with plan._keys_only():
        assert plan._dump(sentence.encoder) == {"kind": "sentence"}
        assert plan._dump(random.encoder) == {"kind": "random"}


def _old_run(tmp_path, a_inputs: dict, b_inputs: dict) -> None:
    """A manifest as versions before KEY_VERSION 2 wrote it: every setting in the key, chained on dep keys."""
    old = Runner.__new__(Runner)
    old.run_dir = tmp_path
    ka = old._hash(a_inputs, {})
    kb = old._hash(b_inputs, {"a": ka})
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {
        "a": {"key": ka, "inputs": a_inputs, "status": "done", "result": {}},
        "b": {"key": kb, "inputs": b_inputs, "status": "done", "result": {}}}}))


def test_run_made_before_key_version_2_is_adopted(tmp_path):
    """A finished stage recorded under the full-settings keys of earlier versions is not redone, also when
    settings were added since at their defaults; a changed or explicitly set new setting redoes it."""
    from llm2clip.pipeline.runner import Stage

    calls = []

    def stages(a_full, a_key, b_full=None, b_key=None):
        b_full, b_key = b_full or {"z": 2, "w": 0}, b_key or {"z": 2}
        return [Stage("a", a_key, calls.append, ("a",), legacy_key=a_full),
                Stage("b", b_key, calls.append, ("b",), deps=["a"], legacy_key=b_full)]

    _old_run(tmp_path, {"x": 1, "y": 0}, {"z": 2, "w": 0})
    r = Runner(tmp_path, stages({"x": 1, "y": 0}, {"x": 1}))
    assert all(r.is_done(s) for s in r.stages)
    r.run()
    assert calls == []
    rec = json.loads((tmp_path / "manifest.json").read_text())["stages"]["a"]
    assert rec["inputs"] == {"x": 1} and rec["key"] == r.keys["a"]
    # a setting added since ("n", nested too), at its default: still the same stages
    _old_run(tmp_path, {"x": 1, "y": {"u": 0}}, {"z": 2, "w": 0})
    Runner(tmp_path, stages({"x": 1, "y": {"u": 0, "n": 3}, "n": None}, {"x": 1})).run()
    assert calls == []
    # the added setting given a non-default value: redone, and what depends on it
    _old_run(tmp_path, {"x": 1, "y": 0}, {"z": 2, "w": 0})
    Runner(tmp_path, stages({"x": 1, "y": 0, "n": 7}, {"x": 1, "n": 7})).run()
    assert calls == ["a", "b"]
    # a changed setting: redone, and what depends on it
    calls.clear()
    _old_run(tmp_path, {"x": 1, "y": 0}, {"z": 2, "w": 0})
    Runner(tmp_path, stages({"x": 5, "y": 0}, {"x": 5})).run()
    assert calls == ["a", "b"]


def test_an_interrupted_stage_of_an_earlier_version_keeps_its_checkpoints(tmp_path):
    """Interrupted under the earlier key format with the same settings: re-keyed with its status, so the rerun
    resumes it from its files instead of clearing its folder."""
    from llm2clip.pipeline.runner import Stage

    seen = []

    def b_stage(folder):
        seen.append(sorted(p.name for p in (tmp_path / "b").iterdir()))

    _old_run(tmp_path, {"x": 1, "y": 0}, {"z": 2, "w": 0})
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["stages"]["b"]["status"] = "running"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "step-000100").write_text("checkpoint")
    stages = [Stage("a", {"x": 1}, list, (), legacy_key={"x": 1, "y": 0}),
              Stage("b", {"z": 2}, b_stage, ("b",), deps=["a"], legacy_key={"z": 2, "w": 0})]
    r = Runner(tmp_path, stages)
    assert r.is_done(stages[0]) and not r.is_done(stages[1])
    r.run()
    assert seen == [["step-000100"]]  # resumed over its checkpoint, not started over in an empty folder
    rec = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert rec["b"]["status"] == "done" and rec["a"]["key_before"] and rec["b"]["key_before"]


def test_stage1_of_a_run_with_bf16_linears_trains_in_full_precision(tmp_path):
    """llm.bf16_linears is for embedding and queries: stage 1 gets the encoder without it (it refuses it), the
    embedding stages keep it."""
    from llm2clip.finetune.config import FinetuneConfig

    d = plan.load_pipeline_config("smoke").model_dump(mode="json", exclude_unset=True)
    d["llm"] = {**d["llm"], "dtype": "float32", "bf16_linears": "mlp"}
    d["run_dir"] = str(tmp_path / "run")
    stages = {s.name: s for s in plan.build_stages(PipelineConfig.model_validate(d))}
    ft = stages["stage1/llm-cc"].args[0]
    assert ft["encoder"]["bf16_linears"] == "none"
    FinetuneConfig.model_validate(ft)  # accepted
    assert stages["embed/llm-raw"].args[0]["encoder"]["bf16_linears"] == "mlp"
    assert "bf16_linears" not in stages["stage1/llm-cc"].key["encoder"]


def test_loading_with_another_dtype_drops_bf16_linears():
    from llm2clip.api import _with_runtime
    from llm2clip.text.config import LLMEncoderConfig

    cfg = LLMEncoderConfig(model="tiny-random-llama", dtype="float32", bf16_linears="mlp")
    assert _with_runtime(cfg, "cpu", torch.bfloat16).bf16_linears == "none"
    assert _with_runtime(cfg, "cpu", torch.float32).bf16_linears == "mlp"
    assert _with_runtime(cfg, "cpu", None).bf16_linears == "mlp"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    SNAPSHOT.write_text(json.dumps(defaults(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
