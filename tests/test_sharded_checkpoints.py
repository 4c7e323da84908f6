"""FSDP checkpoints through torch.distributed.checkpoint: each rank writes its shards into the step folder's
dcp/ (no gather), and a run resumes on another number of processes; the final model stays one file."""

import pickle

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from stage2_helpers import (
    CrashAt,
    SimulatedCrash,
    assert_same_tensors,
    fit_worker_resumable,
    free_port,
    model_weights,
    run_cfg,
    tiny_run_config,
)

from llm2clip.errors import InputError
from llm2clip.train.loop import fit

OVER = dict(train__steps=4, train__checkpoint_every=2, data__val=None, optim__grad_clip=0.5,
            data__caption_kinds={"dense": 1.0})


def _state(run_dir, step):
    return torch.load(run_dir / f"checkpoints/step_{step:08d}/train_state.pt", weights_only=True)


def _files(run_dir, step):
    return sorted(p.name for p in (run_dir / f"checkpoints/step_{step:08d}").iterdir())


def test_fsdp_checkpoints_are_sharded_and_resume_like_plain_ones(tmp_path):
    """In one process (world 1) an fsdp run writes the sharded layout too, so its checkpoints resume on any
    world size; killed after step 3, it resumes from step 2 to the weights of an uninterrupted plain run."""
    fit(run_cfg(tmp_path / "plain", **OVER), progress=False)
    with pytest.raises(SimulatedCrash):
        fit(run_cfg(tmp_path / "f", train__strategy="fsdp", **OVER), progress=False, callbacks=[CrashAt(3)])
    assert _files(tmp_path / "f", 2) == ["dcp", "llm2clip_model.json", "train_state.pt"]
    assert sorted(p.name for p in (tmp_path / "f/checkpoints/step_00000002/dcp").iterdir()) == [
        ".metadata", "__0_0.distcp"]
    assert _state(tmp_path / "f", 2)["optimizer"] is None  # it lives in dcp/
    fit(run_cfg(tmp_path / "f", train__strategy="fsdp", **OVER), resume=True, progress=False)
    assert_same_tensors(model_weights(tmp_path / "plain"), model_weights(tmp_path / "f"), atol=1e-6)
    assert (tmp_path / "f/model/model.safetensors").is_file()  # the export is one ordinary file
    # a step's model, exported for evaluation, is the plain run's at that step
    from llm2clip.model import LLM2CLIP
    from llm2clip.train.checkpoint import export_checkpoint_model

    for run in ("f", "plain"):
        export_checkpoint_model(tmp_path / run / "checkpoints/step_00000004", tmp_path / f"{run}-4")
        LLM2CLIP.load(tmp_path / f"{run}-4")
    assert_same_tensors(model_weights(tmp_path / "plain"), load_file(str(tmp_path / "f-4/model.safetensors")))
    assert_same_tensors(load_file(str(tmp_path / "plain-4/model.safetensors")),
                        load_file(str(tmp_path / "f-4/model.safetensors")), atol=1e-6)
    # a manifest naming a larger model than the weights: an error, not an export with random weights
    import json

    step2 = tmp_path / "f/checkpoints/step_00000002"
    mf = json.loads((step2 / "llm2clip_model.json").read_text())
    mf["config"]["vision"]["layers"] += 1
    (step2 / "llm2clip_model.json").write_text(json.dumps(mf))
    with pytest.raises(InputError, match="lacks"):
        export_checkpoint_model(step2, tmp_path / "f-2")
    mf["config"]["vision"]["layers"] -= 1
    (step2 / "llm2clip_model.json").write_text(json.dumps(mf))
    # and a plain (ddp-strategy) run resumes a sharded checkpoint
    fit(run_cfg(tmp_path / "f", **OVER), resume=str(tmp_path / "f/checkpoints/step_00000002"), progress=False)
    assert_same_tensors(model_weights(tmp_path / "plain"), model_weights(tmp_path / "f"), atol=1e-6)


class _Bomb:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_dcp_metadata_that_names_code_is_refused_unread(tmp_path):
    with pytest.raises(SimulatedCrash):
        fit(run_cfg(tmp_path / "f", train__strategy="fsdp", **OVER), progress=False, callbacks=[CrashAt(3)])
    meta = tmp_path / "f/checkpoints/step_00000002/dcp/.metadata"
    md = pickle.loads(meta.read_bytes())
    md.storage_meta = _Bomb(tmp_path / "pwned")
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(InputError, match=r"\.metadata: refused: the file names \w+\.open"):
        fit(run_cfg(tmp_path / "f", train__strategy="fsdp", **OVER), resume=True, progress=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_sharded_checkpoints_resume_from_2_to_1_and_1_to_2_processes(tmp_path):
    """The reference is one plain process. A 2-rank FSDP run killed after step 3 leaves step 2 as two
    ranks' shards, which one process resumes; a 1-process fsdp run's step 2 resumes on 2 ranks, and so
    does the plain run's own (full) step 2."""
    fit(run_cfg(tmp_path / "one", **OVER), progress=False)
    cfg = tiny_run_config(tmp_path / "two-to-one", train__strategy="fsdp", **OVER)
    mp.spawn(fit_worker_resumable, args=(2, free_port(), cfg, None, 3), nprocs=2, join=True)
    dcp = sorted(p.name for p in (tmp_path / "two-to-one/checkpoints/step_00000002/dcp").iterdir())
    assert dcp == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert _state(tmp_path / "two-to-one", 2)["optimizer"] is None
    fit(run_cfg(tmp_path / "two-to-one", train__strategy="fsdp", **OVER), resume=True, progress=False)
    assert_same_tensors(model_weights(tmp_path / "one"), model_weights(tmp_path / "two-to-one"), atol=1e-5)

    with pytest.raises(SimulatedCrash):
        fit(run_cfg(tmp_path / "one-to-two", train__strategy="fsdp", **OVER), progress=False, callbacks=[CrashAt(3)])
    cfg = tiny_run_config(tmp_path / "one-to-two", train__strategy="fsdp", **OVER)
    mp.spawn(fit_worker_resumable, args=(2, free_port(), cfg, True), nprocs=2, join=True)
    assert _files(tmp_path / "one-to-two", 4) == ["dcp", "llm2clip_model.json", "train_state.pt"]
    assert_same_tensors(model_weights(tmp_path / "one"), model_weights(tmp_path / "one-to-two"), atol=1e-5)
    # a plain run's full checkpoint (model.safetensors + optimizer in the state) resumes on 2 FSDP ranks too
    cfg = tiny_run_config(tmp_path / "plain-to-two", train__strategy="fsdp", **OVER)
    mp.spawn(fit_worker_resumable, args=(2, free_port(), cfg, str(tmp_path / "one/checkpoints/step_00000002")),
             nprocs=2, join=True)
    assert_same_tensors(model_weights(tmp_path / "one"), model_weights(tmp_path / "plain-to-two"), atol=1e-5)
