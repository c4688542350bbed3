"""Encode-once latent cache on the CoProV2 fixture and the tiny SD pipeline: the cache equals
direct encoding, a rerun skips finished shards, the trainer's cache source resumes exactly, and
scripts/train.py trains 2 steps from the cache."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_data_fixtures as F
from pipelines import build_sd

from safealign_jax import UserError
from safealign_jax.data import cache, views
from safealign_jax.data.images import decode_image
from safealign_jax.data.tfds_builders import CoProV2Pairs
from safealign_jax.models.vae import encode as vae_encode
from safealign_jax.pipeline import encode_prompts, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16
tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(built coprov2_pairs folder, SD pipeline folder, cache folder, seconds to build the cache)."""
    tmp = tmp_path_factory.mktemp("cache")
    F.write_coprov2_folder(tmp / "coprov2")
    builder = CoProV2Pairs(table=tmp / "coprov2" / "CoProv2_train.csv", images=tmp / "coprov2" / "images",
                           policy="skip", data_dir=tmp / "tfds")
    builder.download_and_prepare()
    pipeline = build_sd(tmp)
    start = time.perf_counter()
    cache.write_cache(builder.data_dir, pipeline, tmp / "out", resolution=RESOLUTION, batch_size=4,
                      shard_size=4, progress=False)
    seconds = time.perf_counter() - start
    return str(builder.data_dir), pipeline, tmp / "out", seconds


def test_cache_equals_direct_encoding(built):
    dataset, pipeline, out, seconds = built
    source, _ = views.open_built(dataset, "train")
    examples = cache.CachedExamples(out, both_captions=True)
    print(f"cache build: {len(source)} pairs at {RESOLUTION}px in {seconds:.2f}s "
          f"({len(source) / seconds:.1f} pairs/s, incl. model load and compile)")
    assert len(examples) == 2 * len(source) == 12
    pipe = load_pipeline(pipeline)
    images = np.stack([decode_image(source[i][k], RESOLUTION) for i in range(len(source))
                       for k in ("preferred_image", "rejected_image")])
    mean, logvar = vae_encode(pipe.vae, pipe.vae_params, jnp.asarray(images))
    moments = np.concatenate([mean, logvar], axis=-1)
    prompts = [views._text(source[i][f"{kind}_prompt"]) for kind in ("harmful", "safe")
               for i in range(len(source))]
    states = np.asarray(encode_prompts(pipe, prompts)[0])
    for j in range(len(examples)):
        example, i = examples[j], j % len(source)
        assert example["id"] == f"{views._text(source[i]['pair_id'])}/{'safe' if j >= 6 else 'harmful'}"
        np.testing.assert_allclose(example["preferred"], moments[2 * i], atol=1e-6)
        np.testing.assert_allclose(example["rejected"], moments[2 * i + 1], atol=1e-6)
        np.testing.assert_allclose(example["encoder_hidden_states"], states[j], atol=1e-6)
    np.testing.assert_allclose(examples.empty["encoder_hidden_states"],
                               np.asarray(encode_prompts(pipe, [""])[0][0]), atol=1e-6)
    assert example["preferred"].shape == (RESOLUTION // 2, RESOLUTION // 2, 8)
    assert [e["id"] for e in cache.CachedExamples(out, category="Hate")] == [
        "0000000/harmful", "0000008/harmful"]


def test_encode_texts_in_padded_chunks_equals_one_call(built):
    """encode_texts(batch=k): chunks of k prompts padded with "" (the synthetic world's fixed
    shape) give the rows of one unpadded call."""
    pipe = load_pipeline(built[1])
    prompts = ["a cat", "a red car on a road", "", "the sky", "two dogs"]
    states, pooled = cache.encode_texts(pipe, prompts)
    chunked, chunked_pooled = cache.encode_texts(pipe, prompts, batch=2)
    assert states.shape[0] == chunked.shape[0] == 5 and pooled is None and chunked_pooled is None
    np.testing.assert_allclose(chunked, states, atol=1e-6)
    np.testing.assert_allclose(chunked, np.asarray(encode_prompts(pipe, prompts)[0]), atol=1e-6)


def test_rerun_skips_finished_shards_and_refuses_other_settings(built):
    dataset, pipeline, out, _ = built
    metadata = json.loads((out / cache.METADATA).read_text())
    assert metadata["shards"] == ["shard-00000-of-00002.array_record", "shard-00001-of-00002.array_record"]
    first, second = (out / n for n in metadata["shards"])
    stamp = first.stat().st_mtime_ns
    second_bytes = second.read_bytes()
    second.unlink()
    cache.write_cache(dataset, pipeline, out, resolution=RESOLUTION, batch_size=4, shard_size=4,
                      progress=False)
    assert first.stat().st_mtime_ns == stamp  # skipped
    assert second.read_bytes() == second_bytes  # rewritten identically
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    split = out.parent / "two_processes"
    for index in (1, 0):
        cache.write_cache(dataset, pipeline, split, resolution=RESOLUTION, batch_size=4, shard_size=4,
                          process_index=index, process_count=2, progress=False)
    for name in [*metadata["shards"], cache.METADATA, cache.EMPTY]:
        assert (split / name).read_bytes() == (out / name).read_bytes(), name
    with pytest.raises(UserError, match=r"other settings.*resolution"):
        cache.write_cache(dataset, pipeline, out, resolution=8, batch_size=4, shard_size=4, progress=False)


def test_cached_pairs_resume_exactly(built):
    _, _, out, _ = built
    source = cache.CachedPairs(out, seed=3, global_rows=4, rows=slice(2, 4), flip="shared",
                                num_threads=2)
    start = time.perf_counter()
    batches = [next(source) for _ in range(3)]
    seconds = time.perf_counter() - start
    print(f"cache loader: {3 * 2} pairs in {seconds * 1e3:.1f} ms ({6 / seconds:.0f} pairs/s, 1 process)")
    assert batches[0]["latents_w"].shape == (2, RESOLUTION // 2, RESOLUTION // 2, 4)
    assert batches[0]["encoder_hidden_states"].shape == (2, 16, 32)
    assert not np.allclose(batches[0]["latents_w"], batches[0]["latents_l"])
    resumed = cache.CachedPairs(out, seed=3, global_rows=4, rows=slice(2, 4), flip="shared",
                                num_threads=2)
    next(resumed)
    state = json.loads(json.dumps(resumed.get_state()))
    again = cache.CachedPairs(out, seed=3, global_rows=4, rows=slice(2, 4), flip="shared",
                                num_threads=2)
    again.set_state(state)
    for expected in batches[1:]:
        got = next(again)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(UserError, match="not a latent cache"):
        cache.CachedPairs(out.parent, seed=0, global_rows=2, rows=slice(0, 2))


def test_train_script_from_cache(built, tmp_path):
    _, pipeline, out, _ = built
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/train.py:tiny",
         f"--workdir={tmp_path / 'run'}", "--config.data.source=cache",
         f"--config.data.cache_dir={out}", f"--config.model.path={pipeline}/unet",
         "--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
         "--config.train.progress_bar=False", "--config.data.category=Hate",
         "--config.train.sample_every=1", "--config.train.sample_steps=2",
         "--config.train.sample_prompts=the cat|a dog"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert all(np.isfinite(json.loads(x)["loss"]) for x in lines)
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["step_000001.png", "step_000002.png"]  # periodic sample grids of the LoRA


def test_prepare_data_script_builds_from_csv(built, tmp_path):
    _, pipeline, out, _ = built
    source = out.parent / "coprov2"
    command = [sys.executable, "scripts/prepare_data.py", "--config", "configs/prepare_data.py",
               f"--workdir={tmp_path / 'cache'}", f"--config.pipeline={pipeline}",
               f"--config.table={source / 'CoProv2_train.csv'}", f"--config.images={source / 'images'}",
               f"--config.tfds_dir={tmp_path / 'tfds'}", f"--config.resolution={RESOLUTION}",
               "--config.shard_size=4", "--config.dtype=float16", "--config.progress_bar=False"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for _ in range(2):  # the second run finds every shard done
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1])["num_examples"] == 6
    half = cache.CachedExamples(tmp_path / "cache")[5]
    full = cache.CachedExamples(out)[5]
    assert half["id"] == full["id"]
    np.testing.assert_allclose(half["preferred"], full["preferred"], atol=2e-2, rtol=2e-3)
    missing = subprocess.run([*command[:5], "--config.pipeline="], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and "--config.pipeline is empty" in missing.stderr
