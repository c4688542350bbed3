"""scripts/benchmark.py at the tiny preset (shrunk further: a one-level UNet, one repeat): both
sides run, compute the same DPO loss on the same noise, timesteps, latents and text states, and
the JSON report has its fields. Timings are never asserted."""

import importlib.util
import json
import types
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
    assert report["setup"]["attention"] == "auto" and report["setup"]["alternating_repeats"]
    for side in ("jax_train", "torch_eager"):
        entry = report["train"][side]
        for key in ("step_s", "pairs_per_s", "model_tflops", "mfu", "peak_rss_bytes", "warmup_s"):
            assert entry[key] > 0, (side, key)
        assert len(entry["step_s_repeats"]) == 1
    assert report["train"]["jax_train"]["compile_s"] > 0
    assert "n/a" in report["train"]["torch_compile"]
    flops = report["flops"]
    # per pair: policy forward on w and l, its backward (input gradients of the frozen layers, plus
    # both operands of QK^T and PV), reference forward on w and l: 6 to 7 forwards of one image
    unet = flops["unet_forward"]
    assert 6 * 2 * unet < flops["model_per_step"] < 7 * 2 * unet
    assert flops["xla_per_step"] > 0
    assert report["peak"]["tflops"] > 0 and report["peak"]["source"].startswith("measured")
    assert report["ratios"]["torch_eager_over_jax_step_time"] > 0
    sampling = report["sampling"]
    for side in ("jax", "diffusers"):
        assert sampling[side]["images_per_s"] > 0 and sampling[side]["finite"]


def test_repeats_alternate_between_sides(monkeypatch):
    """A B C, C B A, A B C ...: every side sees the same share of a shared machine's slow phases;
    a side that fails to build is reported n/a with its reason."""
    from safealign_jax.bench import compare

    calls = []

    class Side:
        def __init__(self, name):
            self.name = name

        def run(self):
            calls.append(self.name)
            return {"a": 1.0, "b": 2.0, "c": 3.0}[self.name] + len(calls) / 100

        def report(self):
            return {"built": self.name}

    def make_side(name, *_):
        if name == "broken":
            raise RuntimeError("torch.compile is not supported here\nmore")
        return Side(name)

    monkeypatch.setattr(compare, "make_side", make_side)
    config = types.SimpleNamespace(isolate=False)
    results = compare.time_sides(["a", "broken", "b", "c"], config, "", None, [0], 3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert results["broken"] == {"n/a": "torch.compile is not supported here"}
    assert results["b"]["seconds_repeats"] == [2.02, 2.05, 2.08]
    assert results["b"]["seconds"] == 2.05 and results["b"]["built"] == "b"
