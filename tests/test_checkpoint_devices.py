"""A checkpoint is readable on any device count (issue 18, defect 1).

Each side runs in its own process, because the host platform's device count
(`--xla_force_host_platform_device_count`) is fixed when JAX starts. Fast test: a training-style
checkpoint (`Checkpoints.save`, arrays replicated or sharded over an 8-device mesh) is read by
`read_trainable` on 1 device, bitwise. Slow test: a tiny run trained on 8 devices is exported and
resumed on 1 device, and a run trained on 1 device is resumed on 2.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--config.train.pairs_per_device=1", "--config.data.resolution=32",
               "--config.train.progress_bar=False"]

# Saves, on 8 devices, a state whose trainable leaves are replicated (as the trainer keeps them)
# or split by rows over the mesh (as an fsdp-sharded tree would be), plus the values as .npz.
SAVE_ON_8 = textwrap.dedent("""
    import sys, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from safealign_jax.runs import Checkpoints
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    rng = np.random.default_rng(0)
    values = {"lora/x/a": rng.normal(size=(16, 2)).astype(np.float32),
              "lora/x/b": rng.normal(size=(2, 24)).astype(np.float32)}
    specs = {"lora/x/a": P("data"), "lora/x/b": P()}
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
    trainable = {"lora": {"x": {"a": placed["lora/x/a"], "b": placed["lora/x/b"]}}}
    state = {"step": jax.device_put(np.int32(3), NamedSharding(mesh, P())), "trainable": trainable}
    ckpts = Checkpoints(sys.argv[1], keep=1, async_save=False)
    ckpts.save(3, state, {"lora": {"rank": 2, "alpha": 2.0}}, {"index": 3}, {"path": "unet", "sha256": "0"})
    ckpts.close()
    np.savez(sys.argv[2], **values)
""")

# Reads the checkpoint on this process's single device and compares it with the .npz, bitwise.
READ_AND_COMPARE = textwrap.dedent("""
    import sys, jax, numpy as np
    from flax import traverse_util
    from safealign_jax.runs import read_trainable
    assert jax.device_count() == 1
    run = read_trainable(sys.argv[1])
    flat = traverse_util.flatten_dict(run["trainable"], sep="/")
    reference = np.load(sys.argv[2])
    assert sorted(flat) == sorted(reference.files), (sorted(flat), reference.files)
    for key, value in flat.items():
        assert isinstance(value, np.ndarray), (key, type(value))
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    print("compared", len(flat), "arrays of step", run["step"], "config", run["config"]["lora"])
""")


def _run(args: list[str], devices: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_eight_device_checkpoint_reads_on_one_device(tmp_path):
    workdir, reference = str(tmp_path / "run"), str(tmp_path / "values.npz")
    saved = _run(["-c", SAVE_ON_8, workdir, reference], devices=8)
    assert saved.returncode == 0, saved.stderr[-3000:]
    read = _run(["-c", READ_AND_COMPARE, workdir, reference], devices=1)
    assert read.returncode == 0, read.stderr[-3000:]
    assert "compared 2 arrays of step 3 config {'rank': 2, 'alpha': 2.0}" in read.stdout
    assert "devices used to save" not in read.stderr  # the saved 8-device shardings are not used


def _train(workdir: str, steps: int, devices: int) -> dict:
    result = _run(["scripts/train.py", "--config", "configs/train.py:tiny", "--workdir", workdir,
                   f"--config.train.steps={steps}", *TRAIN_FLAGS], devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(Path(workdir, "summary.json").read_text())


@pytest.mark.slow
def test_trained_runs_move_between_device_counts(tmp_path):
    """scripts/train.py on 8 devices -> scripts/export.py on 1 (the issue's commands); the trainer
    resumes 8 -> 1 and 1 -> 2 devices onto the current mesh and goes on."""
    eight, one = str(tmp_path / "eight"), str(tmp_path / "one")
    assert _train(eight, 1, devices=8)["devices"] == 8
    export = _run(["scripts/export.py", "--config", "configs/export.py:peft", "--workdir", str(tmp_path / "out"),
                   f"--config.checkpoint={eight}"], devices=1)
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads(export.stdout)["checkpoint_step"] == 1
    assert (tmp_path / "out" / "lora.safetensors").is_file()

    _train(one, 1, devices=1)
    for workdir, devices in ((eight, 1), (one, 2)):
        summary = _train(workdir, 2, devices)
        assert (summary["devices"], summary["steps_this_run"]) == (devices, 1), summary
        assert sorted(os.listdir(Path(workdir, "checkpoints"))) == ["1", "2"]
