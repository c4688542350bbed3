"""Crash safety of training, proven by really killing processes (tiny config, synthetic pairs, CPU).

- A chain of runs of the SAME command on one workdir, each stopped at a seeded random point
  (SIGKILL mid-step, SIGKILL while an async checkpoint is being written, SIGTERM, SIGINT), then
  one run to the end, yields bit-identical final weights and metrics.jsonl as one uninterrupted run.
- Damaged newest checkpoints (a truncated file, a deleted file) are reported in one line each and
  the newest good one is used (result again bit-identical); with none readable: exit 2, no fresh start.
- A non-finite loss stops the run naming the step and writes the batch ids; skip_nonfinite skips it.
- Two jax.distributed processes: killing one makes the other exit with an error, not hang.

Every run is a fresh `python scripts/train.py` sharing one persistent compilation cache.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_helper import tiny_config, without_speed

from safealign_jax.runs import read_trainable
from safealign_jax.train.data import SyntheticPairs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
ARGS = ["--config", "configs/train.py:tiny", "--config.train.progress_bar=False",
        f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
        "--config.train.log_every=3", "--config.train.keep_checkpoints=3"]
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("jax_cache")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(workdir: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/train.py", *ARGS, "--workdir", str(workdir), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def complete_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if folder.is_dir() else []


def saving(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return [n for n in os.listdir(folder) if "tmp" in n] if folder.is_dir() else []


def wait_for(proc: subprocess.Popen, condition, timeout: float = RUN_TIMEOUT) -> bool:
    """Polls `condition()` every 2 ms until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """One uninterrupted run of STEPS steps, started at once and run alongside the first test;
    calling the fixture's value waits for it and returns its workdir."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc = start(workdir, env)

    def done() -> Path:
        if proc.returncode is None:
            rc, err = finish(proc, timeout=2 * RUN_TIMEOUT)
            assert rc == 0, err[-3000:]
        return workdir

    yield done
    if proc.poll() is None:
        proc.kill()


def assert_same_result(workdir: Path, reference: Path) -> None:
    ours, ref = read_trainable(str(workdir)), read_trainable(str(reference))
    assert ours["step"] == ref["step"] == STEPS
    flat = lambda t: {str(k): np.asarray(v) for k, v in _flatten(t["trainable"]).items()}  # noqa: E731
    a, b = flat(ours), flat(ref)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    records = [without_speed(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records == [without_speed(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, (*prefix, key)).items()}
    return {prefix: tree}


def test_killed_and_preempted_runs_resume_exactly(tmp_path, env, reference):
    """SIGKILL mid-step, SIGKILL during async checkpoint writes, SIGTERM and SIGINT, each
    followed by the same command; the final run's weights and metrics equal the reference."""
    rng = random.Random(12)
    workdir = tmp_path / "run"
    events = ["kill-mid-step", "kill-mid-save", "sigterm", "sigint"]
    log = []
    for event in events:
        resumed = max(complete_steps(workdir), default=0)
        proc = start(workdir, env)
        if event == "kill-mid-save":  # an async save in flight (a few ms into it)
            hit = wait_for(proc, lambda: bool(saving(workdir)) and complete_steps(workdir)[-1:] != [STEPS])
            time.sleep(rng.uniform(0, 0.02))
        else:  # mid-step: a random time after a new checkpoint completed
            hit = wait_for(proc, lambda r=resumed: r < max(complete_steps(workdir), default=0) < STEPS - 4)
            time.sleep(rng.uniform(0, 0.6))
        assert hit and proc.poll() is None, f"{event}: the run ended first ({finish(proc)[1][-2000:]})"
        seen = (complete_steps(workdir), saving(workdir))
        signum = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(event, signal.SIGKILL)
        proc.send_signal(signum)
        rc, err = finish(proc)
        log.append(f"{event}: resumed from {resumed}, at kill complete={seen[0]} saving={seen[1]}, rc={rc}")
        if signum == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:  # a final checkpoint, then exit 128 + signal with one line naming it
            assert rc == 128 + signum, err[-3000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"error: stopped by {signum.name} after step "), err[-3000:]
            step = int(last.split("after step ")[1].split(":")[0])
            assert step in complete_steps(workdir) and step > resumed
    print("\n".join(log))
    assert any("saving=[]" not in entry for entry in log)  # at least one kill hit a save in flight
    rc, err = finish(start(workdir, env))
    assert rc == 0, err[-3000:]
    assert_same_result(workdir, reference())


def _damage(checkpoint: Path, how: str) -> None:
    """"truncate": halves the largest array data file (state/d/*, the merged OCDBT data the
    restore reads); "delete": removes every file of the state."""
    files = sorted((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    if how == "truncate":
        data = [p for p in files if p.parent == checkpoint / "state" / "d"]
        with open(data[0], "r+b") as f:
            f.truncate(data[0].stat().st_size // 2)
    else:
        for f in files:
            f.unlink()


def test_damaged_latest_checkpoints_fall_back_to_previous(tmp_path, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference(), workdir)
    assert complete_steps(workdir) == [STEPS - 4, STEPS - 2, STEPS]
    _damage(workdir / f"checkpoints/{STEPS}", "truncate")
    _damage(workdir / f"checkpoints/{STEPS - 2}", "delete")
    rc, err = finish(start(workdir, env))
    assert rc == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 2, err
    assert f"/{STEPS} is damaged" in warnings[0] and f"/{STEPS - 2} is damaged" in warnings[1], err
    print("\n".join(warnings))
    assert sorted(os.listdir(workdir / "damaged_checkpoints"))[0].startswith(f"{STEPS - 2}-")
    assert_same_result(workdir, reference())  # resumed from STEPS - 4


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference(), workdir)
    for step in (STEPS - 4, STEPS - 2, STEPS):
        _damage(workdir / f"checkpoints/{step}", "delete")
    metrics = (workdir / "metrics.jsonl").read_text()
    rc, err = finish(start(workdir, env))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "none is readable" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert complete_steps(workdir) == [] and (workdir / "metrics.jsonl").read_text() == metrics


class NaNAt(SyntheticPairs):
    """Synthetic pairs whose batch `bad` has NaN winner latents."""

    def __init__(self, bad: int, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def __next__(self) -> dict:
        batch = super().__next__()
        if self.index - 1 == self.bad:
            batch["latents_w"] = np.full_like(batch["latents_w"], np.nan)
        return batch


def nan_run(workdir: Path, **overrides):
    from safealign_jax.train.loop import train

    config = tiny_config({"train.steps": 5, "train.checkpoint_every": 1, "train.log_every": 2,
                          "train.keep_checkpoints": 10, **overrides})
    source = NaNAt(3, seed=config.seed, global_rows=2, rows=slice(0, 2), latent_size=16, channels=4,
                   seq_len=8, context_dim=32)
    return train(config, str(workdir), source=source)


NAN_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from pathlib import Path
from test_crash_safety import nan_run
from safealign_jax.errors import UserError
tmp = Path(sys.argv[1])
try:
    nan_run(tmp / "stop")
    error = None
except UserError as e:
    error = str(e)
_, summary = nan_run(tmp / "skip", **{"train.skip_nonfinite": True})
(tmp / "result.json").write_text(json.dumps({"error": error, "summary": summary}))
"""


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, env):
    """Batch 3 (step 4) has NaN latents: the run stops naming step 4 and its batch ids, keeping
    checkpoint 3; with train.skip_nonfinite the step is skipped (no update) and counted."""
    result = subprocess.run([sys.executable, "-c", NAN_SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["error"].startswith("step 4: non-finite loss nan"), out["error"]
    assert "last good checkpoint: 3" in out["error"]
    report = json.loads((tmp_path / "stop/nonfinite_step_000004.json").read_text())
    assert report["batch_ids"] == ["3:0", "3:1"] and report["last_checkpoint"] == 3
    assert complete_steps(tmp_path / "stop") == [1, 2, 3]  # nothing saved after the bad step
    assert len((tmp_path / "stop/metrics.jsonl").read_text().splitlines()) == 4

    assert out["summary"]["skipped_nonfinite_steps"] == 1
    records = [json.loads(x) for x in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 0]
    before, after = (read_trainable(str(tmp_path / "skip"), s)["trainable"] for s in (3, 4))
    for path, value in _flatten(before).items():  # the bad step applied no update
        np.testing.assert_array_equal(value, _flatten(after)[path])
    assert (tmp_path / "skip/nonfinite_step_000004.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_process_makes_the_other_exit(tmp_path, env):
    port = free_port()
    workdir = tmp_path / "run"
    procs = [start(workdir, env, "--config.train.steps=100000", "--config.distributed.initialize=True",
                   f"--config.distributed.coordinator=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                   "--config.distributed.heartbeat_timeout_s=5", "--config.distributed.shutdown_timeout_s=5")
             for i in range(2)]
    try:
        assert wait_for(procs[0], lambda: 2 in complete_steps(workdir)), finish(procs[0])[1][-3000:]
        procs[1].kill()
        killed = time.monotonic()
        rc, err = finish(procs[0], timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"process 0 exited {elapsed:.1f} s after process 1 was killed, rc={rc}")
    assert rc != 0 and elapsed < 90, err[-3000:]


def test_interrupted_writes_leave_no_half_files(tmp_path, monkeypatch, tiny_unet):
    """Exports, images and unet folders are written to a temporary name and renamed: a write
    that dies half-way leaves neither the target nor a temporary file behind."""
    from safealign_jax import images
    from safealign_jax.convert import files, unet_files

    def half_then_fail(path, data=b"half a file"):
        Path(path).write_bytes(data)
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", lambda tensors, path, metadata=None: half_then_fail(path))
    with pytest.raises(OSError):
        files.write_safetensors(str(tmp_path / "lora.safetensors"), {"a": np.zeros(2, np.float32)}, {})
    monkeypatch.setattr(unet_files, "write_safetensors", lambda path, *a: half_then_fail(path))
    with pytest.raises(OSError):
        unet_files.save_unet_folder(str(tmp_path / "unet"), {"_class_name": "UNet2DConditionModel"},
                                    tiny_unet[1])
    monkeypatch.setattr(images.Image.Image, "save", lambda self, path, **kw: half_then_fail(path))
    with pytest.raises(OSError):
        images.save_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "a.png"))
    assert os.listdir(tmp_path) == []


def test_truncate_metrics_keeps_complete_lines_up_to_the_restored_step(tmp_path):
    from safealign_jax.train.reliability import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 6)]
    path.write_text("".join(lines) + '{"step": 6, "lo')  # a crash in the middle of a line
    truncate_metrics(str(path), 3)
    assert path.read_text() == "".join(lines[:3])
    path.write_text("".join(lines[:2]) + '{"step": 3, "lo')
    truncate_metrics(str(path), 4)  # the cut line is dropped even when its step is kept
    assert path.read_text() == "".join(lines[:2])
    truncate_metrics(str(tmp_path / "absent.jsonl"), 1)
    assert not (tmp_path / "absent.jsonl").exists()
