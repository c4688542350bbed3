"""Training config checks: typos / wrong types / bad values fail in one line naming the field;
mesh sizes, fsdp partition specs and the optimizer schedule."""

import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P
from train_helper import tiny_config

from safealign_jax.errors import UserError
from safealign_jax.train import mesh, state
from safealign_jax.train.config import validate

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), "--config", "configs/train.py:tiny",
         "--workdir", str(tmp_path), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_key(tmp_path):
    assert_one_line_error(run_train(tmp_path, "--config.lora.rnak=4"), "rnak")


def test_wrong_type(tmp_path):
    assert_one_line_error(run_train(tmp_path, "--config.dpo.beta=big"), "--config.dpo.beta=big")


def test_bad_value_from_the_script(tmp_path):
    assert_one_line_error(run_train(tmp_path, "--config.data.resolution=100"),
                          "data.resolution=100", "multiple of 8")


@pytest.mark.parametrize("field, value, fragment", [
    ("lora.rank", 0, "lora.rank=0"),
    ("dpo.beta", -1.0, "dpo.beta=-1.0"),
    ("dpo.caption_dropout", 1.5, "dpo.caption_dropout=1.5"),
    ("optim.name", "sgd", "optim.name='sgd'"),
    ("optim.grad_accum", 0, "optim.grad_accum=0"),
    ("mesh.fsdp", 0, "mesh.fsdp=0"),
    ("model.compute_dtype", "float16", "model.compute_dtype='float16'"),
])
def test_invalid_values(field, value, fragment):
    with pytest.raises(UserError) as e:
        validate(tiny_config({field: value}))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_presets_need_a_model_path():
    config = tiny_config({"preset": "sd15"})
    with pytest.raises(UserError, match=r"model\.path"):
        validate(config)


def test_mesh_shape():
    assert mesh.mesh_shape(-1, 1, 8) == (8, 1)
    assert mesh.mesh_shape(2, -1, 8) == (2, 4)
    with pytest.raises(UserError, match="3 devices"):
        mesh.mesh_shape(3, 1, 8)
    with pytest.raises(UserError, match="does not divide"):
        mesh.mesh_shape(-1, 3, 8)


def test_param_spec():
    assert mesh.param_spec((320, 1280), 8, True, 0) == P(None, "fsdp")
    assert mesh.param_spec((3, 3, 4, 320), 8, True, 0) == P(None, None, None, "fsdp")
    assert mesh.param_spec((7, 5), 8, True, 0) == P()  # nothing divisible
    assert mesh.param_spec((320, 1280), 8, True, 10**9) == P()  # below the size threshold
    assert mesh.param_spec((320, 1280), 8, False, 0) == P()  # flag off


def test_schedule_and_lr_scaling():
    config = tiny_config({"optim.warmup_steps": 4, "optim.learning_rate": 1e-5,
                          "optim.scale_lr_by_pairs": True, "optim.grad_accum": 2})
    peak = state.learning_rate(config, global_pairs=16)
    assert peak == pytest.approx(1e-5 * 32)
    schedule = state.lr_schedule(config, peak)
    assert float(schedule(0)) == 0 and float(schedule(2)) == pytest.approx(peak / 2)
    assert float(schedule(4)) == pytest.approx(peak) and float(schedule(100)) == pytest.approx(peak)


def test_lora_targets_choose_the_adapted_layers(tiny_unet):
    from safealign_jax.train.loop import init_trainable

    _, params = tiny_unet
    default = init_trainable(tiny_config({}), params)["lora"]
    cross_kv = init_trainable(tiny_config({"lora.targets": r"attn2/(to_k|to_v)$"}), params)["lora"]
    paths = _layer_paths(cross_kv)
    assert paths and all("/attn2/" in p and p.rsplit("/", 1)[1] in ("to_k", "to_v") for p in paths)
    assert len(_layer_paths(default)) == 2 * len(paths) * 2  # to_q/k/v/out of attn1 and attn2
    with pytest.raises(UserError, match="matches none"):
        init_trainable(tiny_config({"lora.targets": "no_such_layer$"}), params)


def _layer_paths(lora_tree) -> set[str]:
    """The "/"-joined paths of the LoRA tree's layers (each holds "a" and "b")."""
    from flax import traverse_util

    return {"/".join(path[:-1]) for path in traverse_util.flatten_dict(lora_tree)}
