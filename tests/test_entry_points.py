"""The installable tools: every [project.scripts] target imports and is callable, the configs
ship inside the package (`--config NAME[:arg]` from any folder), and `configs/NAME.py` paths
keep working (configs/ links to safealign_jax/configs)."""

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from safealign_jax import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_is_installed():
    names = ("train", "sample", "export", "merge", "erase", "evaluate", "prepare-data", "embed-users",
             "benchmark", "demo", "train-experts", "convert-single-file", "fit-gates")
    assert set(SCRIPTS) == {f"safealign-{n}" for n in names}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_target_imports(name):
    module, _, function = SCRIPTS[name].partition(":")
    assert module == f"safealign_jax.commands.{name.removeprefix('safealign-').replace('-', '_')}"
    command = importlib.import_module(module)
    assert callable(getattr(command, function)) and callable(command.run)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_calls_the_command(name):
    """scripts/NAME.py is the command's shim: its `main` is the command's `run`."""
    stem = name.removeprefix("safealign-").replace("-", "_")
    text = (ROOT / f"scripts/{stem}.py").read_text()
    assert f"from safealign_jax.commands import {stem} as command" in text and "command.main()" in text


def test_configs_are_a_package_linked_from_the_checkout():
    from safealign_jax.configs import demo, train

    assert (ROOT / "configs").resolve() == Path(train.__file__).parent
    assert demo.get_config("quick").psa.train.lora.rank == 4  # demo.py imports train.py normally


def test_resolve_config(tmp_path, monkeypatch):
    packaged = os.path.join(cli.CONFIGS, "train.py")
    monkeypatch.chdir(tmp_path)
    for given in ("train", "train:sd15", "train.py:sd15", "configs/train.py:sd15"):
        assert cli.resolve_config(given) == packaged + given.partition(":")[1] + given.partition(":")[2]
    (tmp_path / "train.py").write_text("")  # a file of that name here wins
    assert cli.resolve_config("train.py:sd15") == "train.py:sd15"
    assert cli.resolve_config("nope:tiny") is None and cli.resolve_config("") is None


def run_outside(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_packaged_config_from_outside_the_checkout(tmp_path):
    """`--config train:tiny` from a folder without configs/: the packaged config is read, its
    overrides applied and checked by the trainer (steps=0 is refused there, in one line)."""
    result = run_outside(tmp_path, "--config", "train:tiny", "--workdir", "run", "--config.train.steps=0")
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: --config.train.steps=0 is invalid (expected an integer >= 1)."
    assert result.stdout.startswith(f"[   0.0s] train: train:tiny -> {tmp_path / 'run'}\n")
    assert (tmp_path / "xdg/safealign_jax/xla").is_dir()  # the commands' compilation cache
    unknown = run_outside(tmp_path, "--config", "nope:tiny", "--workdir", "run")
    assert unknown.returncode == 2 and "--config nope:tiny: no such config file" in unknown.stderr
    preset = run_outside(tmp_path, "--config", "train:sd9", "--workdir", "run")
    assert preset.returncode == 2 and "configs/train.py:sd9: unknown preset" in preset.stderr
