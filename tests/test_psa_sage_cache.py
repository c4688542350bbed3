"""The Sage latent cache for PSA training (scripts/prepare_data.py --config.kind=sage) on the Sage
fixture and the tiny SD pipeline: records hold the chosen/rejected moments, caption states and user
id; the trainer's source adds the user embeddings read at load time (missing ones: UserError,
or the zero vector with missing_embedding="zeros"),
resumes exactly, and trains the adapter."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_data_fixtures as F
from flax import traverse_util
from pipelines import build_sd
from train_helper import tiny_config

from safealign_jax import UserError
from safealign_jax.data import cache, sage_cache
from safealign_jax.data.images import decode_image
from safealign_jax.train.loop import train
from safealign_jax.trained import load_trained

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(Sage fixture root, pipeline folder, cache folder) with the val split (4 records) cached."""
    tmp = tmp_path_factory.mktemp("sage_cache")
    F.write_sage(tmp / "sage")
    pipeline = build_sd(tmp)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/prepare_data.py"), "--config", str(ROOT / "configs/prepare_data.py"),
         "--workdir", str(tmp / "out"), "--config.kind=sage", f"--config.pipeline={pipeline}",
         f"--config.sage_split={tmp / 'sage' / 'val'}", f"--config.users_csv={tmp / 'sage' / 'users' / 'users.csv'}",
         f"--config.resolution={RESOLUTION}", "--config.batch_size=4", "--config.shard_size=2",
         "--config.progress_bar=False"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_examples"] == 4
    return tmp / "sage", pipeline, tmp / "out"


def source(out, embeddings, **kw):
    return sage_cache.SageCachedPairs(out, embeddings, seed=0, global_rows=2, rows=slice(0, 2),
                                      embed_dim=F.EMBED_DIM, num_threads=0, **kw)


def test_records_and_batches(built):
    root, pipeline, out = built
    metadata, _ = sage_cache.open_sage_cache(out)
    assert metadata["user_ids"] == ["0000001"] * 2 + ["0000002"] * 2 and len(metadata["shards"]) == 2
    examples = sage_cache.SageCachedExamples(out)
    first = examples[0]
    assert first["id"].startswith("user_0000001_sexuality_nude_beach_00012.jpg_u")
    # user 0000001 bans sexuality: for the harmful prompt the safe image is chosen
    pipe = cache.load_encoders(pipeline)
    chosen = decode_image((root / "val" / first["id"].replace(".jpg_u.jpg", "_s.jpg")).read_bytes(), RESOLUTION)
    direct = cache.encode_images(pipe, np.stack([chosen] * 8))[0]
    np.testing.assert_allclose(first["preferred"], direct, atol=1e-5)
    it = source(out, root / "embeddings")
    batch = next(it)
    assert batch["latents_w"].shape == (2, 8, 8, 4) and batch["encoder_hidden_states"].shape[0] == 2
    # the fixture's embeddings are filled with the user number
    ids = sorted(int(v[0]) for v in batch["user_embedding"])
    assert batch["user_embedding"].shape == (2, F.EMBED_DIM) and set(ids) <= {1, 2}
    assert len(it.last_ids()) == 2 and all(i.startswith("user_000000") for i in it.last_ids())
    state = it.get_state()
    following = next(it)
    again = source(out, root / "embeddings")
    again.set_state(state)
    resumed = next(again)
    for key in ("latents_w", "latents_l", "encoder_hidden_states", "user_embedding"):
        np.testing.assert_array_equal(resumed[key], following[key])


def test_user_without_embedding_is_refused(built, tmp_path):
    root, _, out = built
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "0000001.npy", np.zeros(F.EMBED_DIM, np.float32))
    with pytest.raises(UserError, match=r"1 user\(s\) of the Sage cache have no usable embedding"):
        source(out, tmp_path / "emb")
    with pytest.raises(UserError, match="not a Sage latent cache"):
        source(tmp_path, root / "embeddings")


def test_missing_embedding_zeros_gives_the_zero_vector(built, tmp_path):
    """data.missing_embedding="zeros": a user without {id}.npy trains with the zero vector."""
    _, _, out = built
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "0000001.npy", np.full(F.EMBED_DIM, 1.0, np.float32))
    it = source(out, tmp_path / "emb", missing_embedding="zeros")
    seen = set()
    for _ in range(2):
        batch = next(it)
        for record_id, vector in zip(it.last_ids(), batch["user_embedding"], strict=True):
            user = record_id.split("_")[1]
            np.testing.assert_array_equal(vector, np.full(F.EMBED_DIM, float(user == "0000001"), np.float32))
            seen.add(user)
    assert seen == {"0000001", "0000002"}


def test_trains_the_adapter_from_the_cache(built, tmp_path):
    root, pipeline, out = built
    config = tiny_config({
        "model.path": pipeline, "psa.enable": True, "psa.embed_dim": F.EMBED_DIM,
        "data.source": "sage_cache", "data.cache_dir": str(out), "data.embeddings": str(root / "embeddings"),
        "data.num_threads": 0, "train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 2,
    })
    _, summary = train(config, str(tmp_path / "run"))
    assert summary["steps"] == 2 and np.isfinite(summary["final"]["loss"])
    run = load_trained(str(tmp_path / "run"))
    assert run.adapter["proj"]["kernel"].shape == (F.EMBED_DIM, 32) and run.lora is None


def test_batches_carry_the_gated_category_index(built):
    """psa.gated.route on Sage: each row's category_index is where its record's category stands in
    the gated order (spellings matched loosely), -1 for a category that is not gated."""
    root, _, out = built
    it = source(out, root / "embeddings", gated_categories=["violence", "sexuality"])
    seen = {}
    for _ in range(2):
        batch = next(it)
        for record_id, index in zip(it.last_ids(), batch["category_index"], strict=True):
            seen[record_id.split("_")[2]] = int(index)
    assert batch["category_index"].dtype == np.int32
    assert seen == {"sexuality": 1, "hate": -1}
    assert "category_index" not in next(source(out, root / "embeddings"))


def test_category_position_matches_spellings():
    from safealign_jax.data.categories import position

    assert position("Self-Harm", ["hate", "self_harm"]) == 1
    assert position("Harrasment", ["Harassment"]) == 0
    assert position("Shocking", ["hate"]) == -1


def test_routed_gated_training_from_the_cache(built, tmp_path):
    """psa.gated.route=True on a Sage cache: the val split has only Sexuality and Hate records, so
    the Violence gate gets no gradient and stays exactly as it started; the Sexuality gate trains."""
    from test_gated import attn2_deltas

    from safealign_jax.runs import save_trained
    from safealign_jax.train.model import load_base

    root, pipeline, out = built
    base = {"model.path": pipeline, "psa.enable": True, "psa.embed_dim": F.EMBED_DIM, "data.source": "sage_cache",
            "data.cache_dir": str(out), "data.embeddings": str(root / "embeddings"), "data.num_threads": 0}
    _, params, reference = load_base(tiny_config(base))
    folders = []
    for name, tree in zip(("violence", "sexuality"), attn2_deltas(params, 2, seed=3, scale=0.1), strict=True):
        save_trained(str(tmp_path / name), {"delta": tree}, tiny_config(base).to_dict(), reference)
        folders.append(str(tmp_path / name))
    config = tiny_config({**base, "psa.variant": "gated", "psa.gated.experts": ",".join(folders),
                          "psa.gated.route": True, "psa.gated.init_bias": -1.0, "optim.learning_rate": 0.1,
                          "optim.weight_decay": 0.0, "dpo.caption_dropout": 0.0, "train.steps": 2,
                          "train.checkpoint_every": 2, "train.log_every": 2})
    _, summary = train(config, str(tmp_path / "run"))
    assert np.isfinite(summary["final"]["loss"])
    gate = load_trained(str(tmp_path / "run")).gated["gate"]
    np.testing.assert_array_equal(gate["kernel"][:, 0], 0.0)
    assert gate["bias"][0] == np.float32(-1.0)
    assert np.abs(gate["kernel"][:, 1]).max() > 0 and gate["bias"][1] != np.float32(-1.0)


def test_fit_gates_from_the_cache(built, tmp_path):
    """scripts/fit_gates.py: the cache's harmful-prompt records of the gated categories are the
    users' preferences (user 1 bans Sexuality and chose the safe image; user 2 allows Hate and
    chose the harmful one); the fitted, thresholded gates say so and the run samples as gated."""
    from test_gated import attn2_deltas

    from safealign_jax.commands import fit_gates
    from safealign_jax.configs.fit_gates import get_config
    from safealign_jax.runs import save_trained
    from safealign_jax.train.model import load_base

    root, pipeline, out = built
    embeddings, index, prefers_safe = sage_cache.preference_records(out, root / "embeddings", ["Hate", "sexuality"],
                                                                    embed_dim=F.EMBED_DIM)
    records = zip(embeddings[:, 0].tolist(), index.tolist(), prefers_safe.tolist(), strict=True)
    assert sorted(records) == [(1.0, 1, True), (2.0, 0, False)]
    _, params, reference = load_base(tiny_config({"model.path": pipeline}))
    folders = []
    for name, tree in zip(("hate", "sexuality"), attn2_deltas(params, 2, seed=3, scale=0.1), strict=True):
        save_trained(str(tmp_path / name), {"delta": tree}, {}, reference)
        folders.append(str(tmp_path / name))
    config = get_config()
    config.experts, config.cache_dir, config.embeddings = ",".join(folders), str(out), str(root / "embeddings")
    config.embed_dim = F.EMBED_DIM
    fit_gates.run(config, str(tmp_path / "gates"))
    run = load_trained(str(tmp_path / "gates"))
    assert run.categories == ("hate", "sexuality") and run.hard_gates
    summary = json.loads((tmp_path / "gates" / "fit_gates_summary.json").read_text())
    assert summary["records"] == 2 and all(c["fit_accuracy"] == 1.0 for c in summary["categories"].values())
    from safealign_jax import gated

    for user, expected in ((1.0, [0.0, 1.0]), (2.0, [0.0, 1.0])):  # one record per category: b decides
        np.testing.assert_array_equal(gated.gates(run.gated, np.full((1, F.EMBED_DIM), user, np.float32),
                                                  hard=True)[0], expected)
    folded = run.folded_for_user(params, np.full(F.EMBED_DIM, 1.0, np.float32))
    sexuality = gated.category_deltas(run.gated)[1]
    path = next(p for p in traverse_util.flatten_dict(sexuality) if p[-1] == "delta")
    kernel = traverse_util.flatten_dict(params)[(*path[:-1], "kernel")]
    np.testing.assert_allclose(traverse_util.flatten_dict(folded)[(*path[:-1], "kernel")],
                               kernel + traverse_util.flatten_dict(sexuality)[path], atol=1e-6)
