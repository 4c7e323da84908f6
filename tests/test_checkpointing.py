"""The checkpoint format of both training stages: plain data only, atomic folders, newest-complete discovery."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from stage2_helpers import write_pickle_bomb

from llm2clip import checkpointing as C
from llm2clip.errors import ConfigError, InputError


def _draws():
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.gauss(0, 1)  # python's cached second gaussian is part of the state
    np.random.standard_normal()
    state = C.rng_state()
    want = _draws()
    C.write_checkpoint(tmp_path, 1, {"rng": state}, "stage1")
    C.set_rng_state(C.load_state(tmp_path / "step_00000001", "stage1")["rng"])
    assert _draws() == want
    assert torch.load(tmp_path / "step_00000001" / C.STATE_FILE, weights_only=True)["format"] == C.FORMAT


def test_discovery_takes_the_newest_complete_checkpoint_and_prunes(tmp_path):
    for step in (5, 10, 20):
        C.write_checkpoint(tmp_path, step, {}, "stage2", lambda d: (d / "extra.bin").write_bytes(b"x"), keep=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    assert (tmp_path / "step_00000020" / "extra.bin").read_bytes() == b"x"
    (tmp_path / "step_00000030").mkdir()  # killed before its state file: not a checkpoint
    (tmp_path / ".step_00000040.tmp-123").mkdir()  # a killed writer's temp folder
    assert C.latest_checkpoint(tmp_path).name == "step_00000020"
    for step in (99_999_999, 100_000_000):  # past 8 digits: by number, not by name
        C.write_checkpoint(tmp_path, step, {}, "stage2")
    assert C.latest_checkpoint(tmp_path).name == "step_100000000"
    C.write_checkpoint(tmp_path, 20, {"again": 1}, "stage2")  # the same step once more replaces it
    assert C.load_state(tmp_path / "step_00000020")["again"] == 1
    assert C.clear(tmp_path) == 5 and not any(tmp_path.iterdir())


def test_pickled_objects_are_refused_unread(tmp_path):
    f, marker = tmp_path / "step_00000002" / C.STATE_FILE, tmp_path / "pwned"
    write_pickle_bomb(f, marker)
    with pytest.raises(InputError, match=r"train_state\.pt: refused: .*pickled Python objects"):
        C.load_state(f.parent)
    assert not marker.exists()
    torch.load(f, weights_only=False)  # the test's own check: a pickle-trusting load would run it
    assert marker.exists()


def test_unknown_layouts_and_paths_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        C.load_state(tmp_path)
    torch.save({"step": 3, "lora": {}}, tmp_path / C.STATE_FILE)  # e.g. an older or foreign layout
    with pytest.raises(InputError, match="unknown layout"):
        C.load_state(tmp_path)
    (tmp_path / C.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read"):
        C.load_state(tmp_path)
    C.write_checkpoint(tmp_path / "c", 1, {}, "stage1")
    with pytest.raises(InputError, match="a stage1 checkpoint, not a stage2 one"):
        C.load_state(tmp_path / "c" / "step_00000001", "stage2")


def test_shared_files_go_into_the_step_folder_with_the_state(tmp_path):
    """``write_shared``: files every rank writes (sharded state), here in one process, in a subfolder."""
    def shards(d):
        (d / "dcp").mkdir()
        (d / "dcp" / "__0_0.distcp").write_bytes(b"s")

    C.write_checkpoint(tmp_path, 3, {"x": 1}, "stage2", lambda d: (d / "m.json").write_text("{}"), keep=1,
                       write_shared=shards)
    assert sorted(p.name for p in (tmp_path / "step_00000003").iterdir()) == ["dcp", "m.json", C.STATE_FILE]
    assert C.load_state(tmp_path / "step_00000003")["x"] == 1


def _collective_writer(rank, world, port, root):
    import os
    import traceback

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    outcome = []
    for step, fail in ((1, None), (2, "files"), (3, "shard")):
        def files(d, fail=fail):
            if fail == "files":
                raise OSError("disk full")
            (d / "m.json").write_text("{}")

        def shard(d, fail=fail):
            if fail == "shard" and rank == 1:
                raise OSError("quota")
            (d / f"shard{rank}").write_bytes(b"x")

        try:
            C.write_checkpoint(root, step, {"step_of": step}, "stage2", files, write_shared=shard)
            outcome.append("ok")
        except OSError as err:
            outcome.append(str(err))
    (Path(root) / f"outcome{rank}.txt").write_text("\n".join(outcome))
    try:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:  # the test reads the outcome files
        traceback.print_exc()
    os._exit(0)


@pytest.mark.slow
def test_a_collective_checkpoint_is_one_folder_and_a_rank0_failure_ends_every_rank(tmp_path):
    import torch.multiprocessing as mp
    from stage2_helpers import free_port

    mp.spawn(_collective_writer, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "step_00000001").iterdir()) == ["m.json", "shard0", "shard1",
                                                                              C.STATE_FILE]
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000001"]  # steps 2, 3 failed: not published
    lost = "rank 1 could not write its part (OSError: quota)"
    assert (tmp_path / "outcome0.txt").read_text().splitlines() == ["ok", "disk full", lost]
    assert (tmp_path / "outcome1.txt").read_text().splitlines() == [
        "ok", f"checkpoint {tmp_path / 'step_00000002'}: rank 0 could not write it (OSError: disk full)", lost]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_a_rank_that_cannot_see_rank0s_folder_says_the_filesystem_is_not_shared(tmp_path):
    """On node-local disks the other ranks would write their checkpoint parts where rank 0 never sees them;
    each rank first checks that rank 0's folder is visible to it."""
    from llm2clip.checkpointing import _into_shared

    wrote = []
    with pytest.raises(OSError, match="filesystem every node shares"):
        _into_shared(wrote.append, tmp_path / "made-by-rank-0-elsewhere")
    assert wrote == []
    _into_shared(wrote.append, tmp_path)
    assert wrote == [tmp_path]
