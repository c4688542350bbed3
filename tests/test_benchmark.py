"""scripts/benchmark.py at the tiny preset (shrunk further: a one-level UNet, one repeat): both
sides run, compute the same DPO loss on the same noise, timesteps, latents and text states, and
the JSON report has its fields. Timings are never asserted."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
ONE_LEVEL_UNET = dict(
    sample_size=8, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=4, norm_num_groups=8,
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    bench = _load("benchmark_script", REPO / "scripts" / "benchmark.py")
    config = _load("benchmark_config", REPO / "configs" / "benchmark.py").get_config("tiny")
    config.unet = ONE_LEVEL_UNET
    config.resolution, config.pairs, config.seq_len = 64, 2, 8
    config.warmup, config.repeats, config.steps_per_repeat = 1, 1, 1
    config.torch_compile = False
    config.sampling.steps, config.sampling.batch, config.sampling.repeats = 2, 1, 1
    config.peak_matmul_size = 256
    config.isolate = False  # one process: faster here; timings are not checked
    workdir = tmp_path_factory.mktemp("bench")
    bench.main(config, str(workdir), command="pytest tests/test_benchmark.py")
    with open(workdir / "benchmark.json") as f:
        return json.load(f)


def test_both_sides_compute_the_same_loss(report):
    parity = report["parity"]
    print(f"loss ours {parity['jax']['loss']:.7g}, torch {parity['torch']['loss']:.7g}, "
          f"rel err {parity['loss_rel_err']:.1e}; per-image errors {parity['mse_rel_err']:.1e}")
    assert parity["loss_rel_err"] <= 1e-4
    assert parity["mse_rel_err"] <= 1e-4
    # the LoRA is not zero, so the policy differs from the reference and the loss from log 2
    assert parity["jax"]["mse_policy_w"] != parity["jax"]["mse_ref_w"]


def test_report_fields(report):
    assert report["preset"] == "tiny" and report["command"].startswith("pytest")
    assert {"jax", "torch", "diffusers", "peft"} <= set(report["versions"])
    for side in ("jax", "torch_eager"):
        entry = report["train"][side]
        for key in ("step_s", "pairs_per_s", "model_tflops", "mfu", "peak_rss_bytes", "warmup_s"):
            assert entry[key] > 0, (side, key)
    assert report["train"]["jax"]["compile_s"] > 0
    assert "n/a" in report["train"]["torch_compile"]
    flops = report["flops"]
    assert flops["model_per_step"] == 6 * report["setup"]["pairs"] * flops["unet_forward"] > 0
    # the traced step holds at least the 6 forwards' worth of matmuls and convolutions
    assert flops["jaxpr_per_step"] >= flops["model_per_step"]
    assert flops["xla_per_step"] > 0 and report["peak_matmul"]["tflops"] > 0
    assert report["ratios"]["torch_eager_over_jax_step_time"] > 0
    sampling = report["sampling"]
    for side in ("jax", "diffusers"):
        assert sampling[side]["images_per_s"] > 0 and sampling[side]["finite"]
