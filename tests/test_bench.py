"""safealign_jax.bench: hand-counted FLOPs, the datasheet / measured peak and MFU, the compiled
memory of the train step from abstract shapes, and the trainer's speed fields in metrics.jsonl."""

import json
import types

import jax
import jax.numpy as jnp
import pytest
from train_helper import run, tiny_config

from safealign_jax.models import UNet2DConditionModel, UNetConfig
from safealign_jax.models.attention import attend
from safealign_jax.models.load import param_count
from safealign_jax.perf.flops import count_flops, model_flops
from safealign_jax.perf.peak import Peak, datasheet_peak, measured_peak, mfu


def test_matmul_and_conv_flops_by_hand():
    a, b = jnp.ones((4, 5)), jnp.ones((5, 6))
    assert count_flops(jnp.dot, a, b) == 2 * 4 * 6 * 5
    x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert count_flops(conv, x, w) == 2 * (8 * 8 * 16) * (3 * 3 * 3)
    # a scan's body counts once per iteration; elementwise work not at all
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (jnp.tanh(c @ b[:, :5]), None), a, None, length=7)[0]  # noqa: E731
    assert count_flops(scanned, a, b) == 7 * 2 * 4 * 5 * 5


def test_attention_flops_are_the_same_for_every_implementation_count():
    """QK^T and PV: 2 x 2 B H Tq Tk d forward; the model count traces XLA attention."""
    b, t, heads, d = 2, 256, 2, 8
    q = jnp.ones((b, t, heads * d))
    assert count_flops(lambda q: attend(q, q, q, heads, implementation="xla"), q) == 2 * 2 * b * heads * t * t * d
    # the chunked path's custom backward recomputes QK^T once (7 matmuls, not the model's 6)
    # and contracts dO with O per row (the softmax gradient's row sums, 2 B H T d)
    grad = lambda impl: count_flops(jax.grad(lambda q: attend(q, q, q, heads, implementation=impl).sum()), q)  # noqa: E731
    assert grad("xla") == 6 * 2 * b * heads * t * t * d
    assert grad("chunked") == 7 * 2 * b * heads * t * t * d + 2 * b * heads * t * d


def test_model_flops_ignore_remat_and_attention_implementation():
    config = UNetConfig(block_out_channels=(32,), layers_per_block=(1,), transformer_layers_per_block=(1,),
                        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        cross_attention_dim=32, attention_head_dim=(4,), norm_num_groups=8)
    module = UNet2DConditionModel(config)
    inputs = module.dummy_inputs(batch=2, size=16, seq_len=8)
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    make = lambda m: lambda p: m.apply({"params": p}, *inputs).sum()  # noqa: E731
    counts = {(attention, remat): model_flops(lambda m: jax.grad(make(m)), module.clone(
        attention=attention, remat_policy=remat), params)
        for attention in ("chunked", "xla") for remat in ("none", "full")}
    assert len(set(counts.values())) == 1
    # and the backward of a full-remat step really holds more matmuls than the model count
    remat = module.clone(attention="xla", remat_policy="full")
    assert count_flops(jax.grad(make(remat)), params) > counts["xla", "none"]


@pytest.mark.parametrize("kind,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
                                         ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459)])
def test_datasheet_peaks(kind, tflops):
    peak = datasheet_peak(types.SimpleNamespace(device_kind=kind))
    assert peak.flops == tflops * 1e12 and peak.source.startswith("datasheet")


def test_cpu_peak_is_measured_and_labelled():
    cpu = jax.devices("cpu")[0]
    assert datasheet_peak(cpu) is None
    peak = measured_peak(cpu, n=256, repeats=3)
    assert peak.flops > 0 and peak.source.startswith("measured: fp32 256^3 matmul")
    assert mfu(3e12, 0.5, Peak(4e12, "x"), devices=3) == pytest.approx(0.5)


@pytest.mark.slow
def test_compiled_memory_of_a_bf16_base_is_half_its_fp32_weights():
    from safealign_jax.bench.memory import compiled_memory, unet_structure

    sizes = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config({"model.param_dtype": dtype, "train.pairs_per_device": 1,
                              "data.resolution": 64})
        sizes[dtype] = compiled_memory(config)
    structure = unet_structure(config)
    module = UNet2DConditionModel(structure)
    params = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs(size=2, seq_len=1))["params"]
    # arguments: the base weights, the fp32 LoRA + AdamW state, the batch; only the base changes
    assert sizes["float32"]["argument_bytes"] - sizes["bfloat16"]["argument_bytes"] == 2 * param_count(params)
    for entry in sizes.values():
        assert entry["total_bytes"] == (entry["argument_bytes"] + entry["output_bytes"] + entry["temp_bytes"]
                                        - entry["alias_bytes"]) > 0
        assert entry["model_flops"] == sizes["float32"]["model_flops"] > 0


def test_trainer_logs_speed_and_caches_compilation(tmp_path):
    _, summary = run(str(tmp_path), {"train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 2})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["pairs_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] > 0
        # TFLOP/s = pairs/s / pairs per step x FLOPs per step
        assert r["tflops_per_s"] == pytest.approx(r["pairs_per_s"] / 2 * summary["model_flops_per_step"] / 1e12)
    assert summary["peak"].startswith("measured")  # CPU: no datasheet figure
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compilation_cache")
    assert any((tmp_path / "compilation_cache").iterdir())
