"""The training loop end to end on the tiny config (CPU): resume exactness, base-model check,
1 device vs 8 simulated devices (data and fsdp layouts), 1 process vs 2 jax.distributed processes.

Every training runs in a fresh python (tests/train_helper.py) so each can choose its device count;
they share one persistent compilation cache, so identical programs compile once.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helper import without_speed

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests/train_helper.py"
PAIRS = 8  # global pairs per step in every layout
# Layouts differ only in fp32 reduction order. Adam with a tiny eps turns gradients that are
# rounding noise into full +-lr steps (its first update is lr * sign(g)), so the runs compared
# use eps = 1 (still Adam, but an update is linear in a gradient much smaller than 1).
COMMON = {"train.pairs_per_device": PAIRS, "optim.eps": 1.0}
# Allowed max |diff| as a fraction of how far the weights move in 5 further steps.
TOL = 1e-3


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def run_jobs(jobs: list[dict], cache: str, devices: int = 1, extra_env: dict | None = None,
             wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **(extra_env or {}))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.Popen([sys.executable, str(HELPER), json.dumps(jobs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def job(tmp: Path, name: str, workdir: str, **overrides) -> dict:
    return {"workdir": str(tmp / workdir), "out": str(tmp / f"{name}.npz"), "overrides": overrides}


def load(tmp: Path, name: str) -> dict:
    with np.load(tmp / f"{name}.npz") as f:
        return dict(f)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def check_close(single: Path, other: dict, label: str) -> None:
    ref = load(single, "ref5")
    diff, movement = max_diff(ref, other), max_diff(ref, load(single, "full10"))
    print(f"{label}: max abs diff {diff:.2e} (5-step movement {movement:.2e})")
    assert diff < TOL * movement


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache) -> Path:
    """1 device: 5 steps (ref5), 10 straight (full10), ref5's workdir resumed to 10 (resumed10),
    then resumed again with another base model / LoRA rank (other_base / other_rank: refused)."""
    tmp = tmp_path_factory.mktemp("single")
    common = COMMON
    run_jobs([
        job(tmp, "ref5", "b", **common, **{"train.steps": 5}),
        job(tmp, "full10", "a", **common, **{"train.steps": 10}),
        job(tmp, "resumed10", "b", **common, **{"train.steps": 10}),
        job(tmp, "other_base", "b", **common, **{"train.steps": 12, "seed": 1}),
        job(tmp, "other_rank", "b", **common, **{"train.steps": 12, "lora.rank": 3}),
    ], cache)
    return tmp


def test_resume_matches_uninterrupted_run(single):
    full, resumed = load(single, "full10"), load(single, "resumed10")
    assert full.keys() == resumed.keys() and len(full) > 0
    for k in full:
        np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
    assert max_diff(full, load(single, "ref5")) > 0  # training moved the weights
    # Every logged value is identical but the wall-clock speed of the log steps (pairs/s, MFU).
    records_full = [without_speed(x) for x in (single / "a/metrics.jsonl").read_text().splitlines()]
    records_resumed = [without_speed(x) for x in (single / "b/metrics.jsonl").read_text().splitlines()]
    assert len(records_full) == 10 and [r["step"] for r in records_full] == list(range(1, 11))
    assert records_full == records_resumed
    final = json.loads((single / "full10.json").read_text())["final"]
    assert without_speed(json.dumps(final)) == records_full[-1]
    print(f"1 device: {json.loads((single / 'full10.json').read_text())['steps_per_s']:.2f} steps/s")
    assert sorted(os.listdir(single / "b/checkpoints")) == ["10", "5"]


def test_resume_with_other_base_model_is_refused(single):
    error = json.loads((single / "other_base.json").read_text())["error"]
    assert "base model" in error and "new --workdir" in error


def test_resume_with_other_lora_rank_is_refused(single):
    error = json.loads((single / "other_rank.json").read_text())["error"]
    assert "--config.lora.rank=2, not 3" in error


def test_eight_devices_data_and_fsdp_match_one_device(single, tmp_path, cache):
    common = {**COMMON, "train.pairs_per_device": PAIRS // 8, "train.steps": 5}
    run_jobs([
        job(tmp_path, "data", "data", **common),
        job(tmp_path, "fsdp", "fsdp", **common, **{"mesh.data": 1, "mesh.fsdp": -1,
                                                    "mesh.shard_params": True, "mesh.shard_min_size": 0}),
    ], cache, devices=8)
    for name, mesh in (("data", {"data": 8, "fsdp": 1}), ("fsdp", {"data": 1, "fsdp": 8})):
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        assert summary["mesh"] == mesh and summary["devices"] == 8
        assert (summary["fsdp_sharded_param_leaves"] > 0) == (name == "fsdp")
        print(f"8 devices ({name}): {summary['steps_per_s']:.2f} steps/s")
        check_close(single, load(tmp_path, name), f"1 vs 8 devices ({name})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(single, tmp_path, cache):
    port = free_port()
    procs = []
    for i in range(2):
        overrides = {**COMMON, "train.pairs_per_device": PAIRS // 2, "train.steps": 5,
                     "distributed.initialize": True, "distributed.coordinator": f"127.0.0.1:{port}",
                     "distributed.num_processes": 2, "distributed.process_id": i}
        procs.append(run_jobs([job(tmp_path, f"proc{i}", "run", **overrides)], cache, wait=False))
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "proc0.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert not (tmp_path / "proc1.npz").exists()  # only process 0 writes
    check_close(single, load(tmp_path, "proc0"), "1 vs 2 processes")
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["5"]
