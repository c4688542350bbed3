"""`scripts/train.py` as a user runs it: the first line before JAX is imported, one line per
start-up stage with its time, `--verbosity=-2` prints only the result, and a finished run says so
(and leaves its summary.json as it was)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[ *(\d+\.\d)s\] (.*)$")


def train(tmp: Path, unet: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp / "xdg")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/train.py:tiny",
         "--workdir", str(tmp / "run"), f"--config.model.path={unet}",
         f"--config.train.compilation_cache={tmp / 'cache'}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_unet_dir):
    """(first run of 2 steps, quiet resume to 3 steps, rerun of the finished run, tmp folder)."""
    tmp = tmp_path_factory.mktemp("startup")
    first = train(tmp, tiny_unet_dir, "--config.train.steps=2")
    quiet = train(tmp, tiny_unet_dir, "--config.train.steps=3", "--verbosity=-2")
    summary = (tmp / "run/summary.json").read_bytes()
    again = train(tmp, tiny_unet_dir, "--config.train.steps=3")
    assert (tmp / "run/summary.json").read_bytes() == summary
    return first, quiet, again, tmp


def test_each_stage_prints_a_line_with_its_time(runs, tiny_unet_dir):
    first, _, _, tmp = runs
    lines = first.stdout[:first.stdout.index("\n{")].splitlines()
    stamped = [LINE.match(line) for line in lines]
    assert all(stamped), lines
    messages = [m.group(2) for m in stamped]
    assert messages[0] == f"train: configs/train.py:tiny -> {tmp / 'run'}"
    assert messages[1] == "importing JAX and the trainer ..."
    assert float(stamped[0].group(1)) < 1.0  # printed before the heavy imports
    done = {m.split(": ")[0]: float(m.rsplit(": ", 1)[1].removesuffix(" s")) for m in messages
            if m.endswith(" s") and ": " in m}
    stages = [name for name in done if not name.startswith("train")]
    assert stages == [f"loading the base UNet ({tiny_unet_dir})",
                      "initialising the trainable weights and the optimizer",
                      "building the data (synthetic)",
                      "preparing the step, sample grids and logs",
                      f"compiling the train step (cache {tmp / 'cache'})",
                      "counting the step's FLOPs and the device peak",
                      "step 1"], messages
    assert "starting at step 0 of 2" in messages
    assert json.loads(first.stdout[first.stdout.index("\n{"):])["steps_this_run"] == 2
    assert "train:" in first.stderr  # the tqdm bar


def test_quiet_prints_only_the_result(runs):
    _, quiet, _, _ = runs
    summary = json.loads(quiet.stdout)  # nothing but the summary on stdout
    assert (summary["steps"], summary["steps_this_run"]) == (3, 1)
    assert "train:" not in quiet.stderr and "winner" not in quiet.stderr  # no bar, no warning


def test_a_finished_run_says_so(runs):
    _, _, again, tmp = runs
    assert again.stdout.splitlines()[-1] == f"run already finished at step 3: {tmp / 'run'}"
    assert "compiling" not in again.stdout
