"""scripts/merge.py (+ scripts/export.py) on expert checkpoints of the tiny SD pipeline's UNet,
calibrated on the CoProV2 fixture's latent cache: a Co-Merge re-factored by SVD exports as a peft
LoRA; a linear merge kept at full rank loads with `load_trained` and equals the average of the
experts' deltas and exports as a folded UNet; one-line user errors (incl. an expert trained on another base model); and the whole path
scripts/train_experts.py (Hate, Shocking; resumable) -> merge -> export and sample (issue #6's CI
check)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_data_fixtures as F
from flax import traverse_util
from pipelines import build_sd
from train_helper import tiny_config

from safealign_jax import lora
from safealign_jax.convert.lora_files import load_lora_file
from safealign_jax.data import cache
from safealign_jax.data.tfds_builders import CoProV2Pairs
from safealign_jax.models import load_unet
from safealign_jax.runs import hash_folder, save_trained
from safealign_jax.trained import load_trained

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ("hate", "sexual", "violence")
tfds.disable_progress_bar()


def script(name, config, workdir, *overrides, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / f"scripts/{name}.py"), "--config", str(ROOT / config),
                           f"--workdir={workdir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tmp folder, tiny SD pipeline folder, latent cache of the CoProV2 fixture at 16 px)."""
    tmp = tmp_path_factory.mktemp("merge")
    F.write_coprov2_folder(tmp / "coprov2")
    builder = CoProV2Pairs(table=tmp / "coprov2" / "CoProv2_train.csv", images=tmp / "coprov2" / "images",
                           policy="skip", data_dir=tmp / "tfds")
    builder.download_and_prepare()
    pipeline = build_sd(tmp)
    cache.write_cache(builder.data_dir, pipeline, tmp / "cache", resolution=16, batch_size=4, shard_size=8,
                      progress=False)
    return tmp, pipeline, tmp / "cache"


@pytest.fixture(scope="module")
def experts(world):
    """tmp/experts/{hate,sexual,violence}: random rank-2 LoRA checkpoints on the pipeline's UNet,
    saved like training runs (same config and base-model hash as scripts/train.py writes)."""
    tmp, pipeline, _ = world
    unet = f"{pipeline}/unet"
    _, params = load_unet(unet)
    config = tiny_config({"model.path": unet}).to_dict()
    base = {"path": os.path.abspath(unet), "sha256": hash_folder(os.path.abspath(unet))}
    for i, name in enumerate(EXPERTS):
        tree = lora.init(jax.random.key(i), params, lora.LoRAConfig(rank=2))
        tree = jax.tree.map(lambda x, k=i: x + 0.05 * (k + 1) * jax.random.normal(jax.random.key(10 + k), x.shape),
                            tree)
        save_trained(str(tmp / "experts" / name), {"lora": tree}, config, base, step=2)
    return tmp / "experts", params


def check_comerge_svd_and_peft_export(experts_dir, names, params, cache_dir, tmp_path):
    result = script("merge", "configs/merge.py:comerge", tmp_path / "merged", f"--config.experts={experts_dir}",
                    f"--config.calibration.cache_dir={cache_dir}", "--config.calibration.num_examples=4",
                    "--config.calibration.batch_size=2", "--config.output.form=svd", "--config.output.rank=4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "merged" / "merge_summary.json").read_text())
    assert summary["experts"] == list(names)
    assert set(summary["timings_s"]) >= {"calibration_s", "selection_s", "svd_s"}
    expert = load_trained(str(experts_dir / names[0]))
    merged = load_trained(str(tmp_path / "merged"))
    deltas = traverse_util.flatten_dict(lora.delta(expert.lora, 1.0))
    assert set(summary["layers"]) == {"/".join(p[:-1]) for p in deltas}
    for layer, entry in summary["layers"].items():
        fan_in, fan_out = deltas[(*layer.split("/"), "delta")].shape
        assert sum(entry["wins"].values()) == fan_in * fan_out
        assert 0 <= entry["relative_error"] < 1
    assert merged.lora_scale == 1.0 and merged.base_model == expert.base_model
    assert {k: v.shape for k, v in traverse_util.flatten_dict(merged.lora).items()} == {
        k: (v.shape[0], 4) if k[-1] == "a" else (4, v.shape[1])
        for k, v in traverse_util.flatten_dict(expert.lora).items()}
    exported = script("export", "configs/export.py:peft", tmp_path / "peft", f"--config.checkpoint={tmp_path / 'merged'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    tree, rank, alpha = load_lora_file(str(tmp_path / "peft" / "lora.safetensors"), params)
    assert (rank, alpha) == (4, 4.0)
    for path, value in traverse_util.flatten_dict(tree).items():
        np.testing.assert_allclose(np.asarray(value), traverse_util.flatten_dict(merged.lora)[path], rtol=1e-6)
    return result


def test_comerge_svd_then_peft_export(world, experts, tmp_path):
    experts_dir, params = experts
    result = check_comerge_svd_and_peft_export(experts_dir, EXPERTS, params, world[2], tmp_path)
    print(result.stdout)


def test_linear_delta_loads_averages_and_folds(experts, tmp_path):
    experts_dir, params = experts
    runs = [experts_dir / n for n in EXPERTS[:2]]
    result = script("merge", "configs/merge.py:linear", tmp_path / "merged", f"--config.experts={runs[0]},{runs[1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_trained(str(tmp_path / "merged"))
    assert merged.lora is None and merged.unet_variables()["lora"] is merged.delta
    deltas = [traverse_util.flatten_dict(lora.delta(e.lora, e.lora_scale)) for e in map(load_trained, map(str, runs))]
    got = traverse_util.flatten_dict(merged.delta)
    assert got.keys() == deltas[0].keys()
    for path, value in got.items():
        np.testing.assert_allclose(value, (np.asarray(deltas[0][path]) + np.asarray(deltas[1][path])) / 2, atol=1e-7)
    again = script("merge", "configs/merge.py:linear", tmp_path / "merged", f"--config.experts={runs[0]},{runs[1]}")
    assert again.returncode == 2 and "already holds a checkpoint 0" in again.stderr
    exported = script("export", "configs/export.py:unet", tmp_path / "unet", f"--config.checkpoint={tmp_path / 'merged'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    _, folded = load_unet(str(tmp_path / "unet" / "unet"))
    folded = traverse_util.flatten_dict(folded)
    for path, value in traverse_util.flatten_dict(lora.fold_delta(params, merged.delta)).items():
        np.testing.assert_allclose(np.asarray(folded[path]), np.asarray(value), atol=1e-6)


def test_user_errors_are_one_line(experts, tmp_path):
    experts_dir, _ = experts
    hate = load_trained(str(experts_dir / "hate"))
    save_trained(str(tmp_path / "other" / "sd21"), {"lora": hate.lora}, hate.config,
                 {"path": "/models/sd21", "sha256": "f" * 64})
    cases = [
        (("configs/merge.py:linear", f"--config.experts={tmp_path}"), "holds no expert workdirs"),
        (("configs/merge.py:comerge", f"--config.experts={experts_dir}"), "calibration.cache_dir is empty"),
        (("configs/merge.py:ties", f"--config.experts={experts_dir / 'hate'},{tmp_path / 'other' / 'sd21'}"),
         "sd21 was trained on base model '/models/sd21'"),
    ]
    for (config, *overrides), message in cases:
        result = script("merge", config, tmp_path / "out", *overrides)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1


def test_train_experts_then_comerge_and_export(world, tmp_path):
    """~80 s on 2 cores: two tiny DPO trainings from the cache, a resumed no-op rerun, a merge,
    its export and a sample from it."""
    _, pipeline, cache_dir = world
    workdir = tmp_path / "runs"
    args = ("--config.data.source=cache", f"--config.data.cache_dir={cache_dir}",
            f"--config.model.path={pipeline}/unet", "--config.train.steps=2", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.train.progress_bar=False",
            "--config.optim.learning_rate=0.05", "--config.train.pairs_per_device=1",
            "--config.experts.categories=Hate,shocking")
    first = script("train_experts", "configs/train.py:tiny", workdir, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(workdir / "experts")) == ["hate", "shocking"]
    for name, category in (("hate", "Hate"), ("shocking", "Shocking")):
        lines = (workdir / "experts" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2]
        assert load_trained(str(workdir / "experts" / name)).config["data"]["category"] == category
    again = script("train_experts", "configs/train.py:tiny", workdir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "experts/hate: finished, skipped" in again.stdout and "experts/shocking: finished, skipped" in again.stdout
    _, params = load_unet(f"{pipeline}/unet")
    check_comerge_svd_and_peft_export(workdir / "experts", ("hate", "shocking"), params, cache_dir, tmp_path)
    (tmp_path / "prompts.txt").write_text("a knife on a table\n")
    sampled = script("sample", "configs/sample.py", tmp_path / "samples", f"--config.checkpoint={tmp_path / 'merged'}",
                     f"--config.prompts={tmp_path / 'prompts.txt'}", "--config.steps=2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / "samples" / "00000.png").is_file()
    synthetic = script("train_experts", "configs/train.py:tiny", tmp_path / "exp")
    assert synthetic.returncode == 2 and "data.source=synthetic" in synthetic.stderr
