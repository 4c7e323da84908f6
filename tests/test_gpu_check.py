"""benchmarks/gpu_check.py: its dry run takes the GPU check's code path on the CPU; a failing part is recorded
and the others still run; the FLOP count behind the MFU is the architecture's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    gpu_md = (REPO / "benchmarks" / "GPU.md").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert (REPO / "benchmarks" / "GPU.md").read_text() == gpu_md  # figures only from a GPU
    return p, out


def test_dry_run_passes_every_part(dry_run):
    p, out = dry_run
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    parts = {r["name"]: r for r in result["parts"]}
    assert list(parts) == ["stage1", "embed", "stage2_ddp", "stage2_fsdp", "throughput"]
    for r in parts.values():
        assert r["ok"], (r["name"], r["error"])
        assert "seconds" in r  # recorded for the report; its value is the benchmark's business, not a test's
    assert parts["embed"]["detail"].startswith("store:")  # the stage-1 encoder's store, which stage 2 trains on
    for name in ("stage2_ddp", "stage2_fsdp"):
        assert len(parts[name]["losses"]) == 2
    # one process, same seed: DDP and FSDP take the same first step
    assert parts["stage2_ddp"]["losses"][0] == pytest.approx(parts["stage2_fsdp"]["losses"][0], rel=1e-3)
    rows = parts["throughput"]["rows"]
    assert [r["grad_ckpt"] for r in rows] == [False, True]
    assert all("images_per_s" in r and r["train_tflop_per_image"] > 0 for r in rows)  # a rate: recorded, not judged
    table = (out / "gpu_check.md").read_text()
    assert "| stage2_fsdp | ok |" in table and "images/s" in table


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    ran = []

    def fails(work, s, limit, dry):
        ran.append("stage1")
        raise RuntimeError("exit 1; stderr ends:\nCUDA out of memory")

    def passes(name):
        def part(work, s, limit, dry):
            ran.append(name)
            return {"detail": f"{name} fine"}
        return part

    parts = {name: passes(name) for name in gpu_check.PARTS}
    parts["stage1"] = fails
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    result = gpu_check.run_check(tmp_path, dry=True)
    assert ran == list(gpu_check.PARTS)
    first, *rest = result["parts"]
    assert not first["ok"] and "CUDA out of memory" in first["error"]
    assert all(r["ok"] for r in rest)
    assert "| stage1 | FAILED |" in (tmp_path / "gpu_check.md").read_text()
    # a spent budget is a recorded failure too, not a silent skip
    result = gpu_check.run_check(tmp_path, dry=True, budget=0)
    assert all(not r["ok"] and "budget" in r["error"] for r in result["parts"])


def test_vit_l14_336_training_flops_are_counted_on_the_architecture():
    from bench_stage2 import peak_bf16_tflops, train_flops_per_image

    flops = train_flops_per_image({"kind": "adapter", "tower": "ViT-L-14-336", "text_dim": 4096})
    # 24 blocks x 577 tokens x 1024 wide: 2 x 577 x 12 x 1024^2 (matmuls) + 4 x 577^2 x 1024 (attention) per
    # block forward, x 3 with the backward; the adapter adds about 1.6 GFLOP
    by_hand = 3 * 24 * (2 * 577 * 12 * 1024**2 + 4 * 577**2 * 1024)
    assert flops == pytest.approx(by_hand, rel=0.02)
    assert 1.13e12 < flops < 1.16e12
    assert peak_bf16_tflops("NVIDIA H200") == 989.0 and peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("some CPU") is None
