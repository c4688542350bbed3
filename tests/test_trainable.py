"""safealign_jax.trainable: one object turns a run's trees and scales into UNet collections, dense
deltas and folded params; run folders record the real kind and scales (old runs still read)."""

import jax
import numpy as np
import pytest

from safealign_jax import UserError, adapter
from safealign_jax.runs import Checkpoints, save_trained
from safealign_jax.trainable import Trainable, expert, record, scales_of
from safealign_jax.trained import load_trained

A = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], np.float32)  # (in 3, r 2)
B = np.array([[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 2.0]], np.float32)  # (r 2, out 4)
LORA = {"blk": {"to_q": {"a": A, "b": B}}}
DELTA = {"blk": {"to_q": {"delta": A @ B}}}


def test_kind_and_validation():
    assert Trainable({"lora": LORA}).kind == "lora"
    assert Trainable({"adapter": {}, "lora": LORA}).kind == "lora+adapter"
    assert Trainable({"delta": DELTA}).scale("delta") == 1.0
    for tree, fragment in [({}, "expected some of"), ({"lora": LORA, "delta": DELTA}, "both a LoRA and a full delta"),
                           ({"gated": {}, "adapter": {}}, "a gated run holds it alone"), ({"bias": {}}, "'bias'")]:
        with pytest.raises(UserError, match=fragment):
            Trainable(tree).validate("run")


def test_collections_fold_the_scale_into_b_or_the_delta():
    lora_collection = Trainable({"lora": LORA}, {"lora": 2.5}).collections()
    assert set(lora_collection) == {"lora"}
    np.testing.assert_array_equal(lora_collection["lora"]["blk"]["to_q"]["a"], A)
    np.testing.assert_array_equal(lora_collection["lora"]["blk"]["to_q"]["b"], 2.5 * B)
    delta_collection = Trainable({"delta": DELTA}, {"delta": 0.5}).collections()
    np.testing.assert_array_equal(delta_collection["lora"]["blk"]["to_q"]["delta"], 0.5 * (A @ B))
    assert Trainable({"delta": DELTA}).collections()["lora"] is DELTA  # scale 1: the tree itself
    assert Trainable({"lora": LORA}).user_tokens(np.zeros((1, 3))) is None


def test_dense_delta_and_fold_by_hand():
    # s a b for row 0, column 0: 2 * (1 * 1 + 2 * 0.5) = 4
    delta = Trainable({"lora": LORA}, {"lora": 2.0}).delta()["blk"]["to_q"]["delta"]
    assert float(delta[0, 0]) == 4.0
    np.testing.assert_allclose(delta, 2.0 * A @ B, rtol=1e-6)
    np.testing.assert_array_equal(expert(DELTA, 3.0).delta()["blk"]["to_q"]["delta"], 3.0 * (A @ B))
    assert expert(LORA).kind == "lora" and expert(DELTA).kind == "delta"
    params = {"blk": {"to_q": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)}}}
    folded = Trainable({"lora": LORA}, {"lora": 2.0}).folded(params)
    np.testing.assert_allclose(folded["blk"]["to_q"]["kernel"], 1.0 + 2.0 * A @ B, rtol=1e-6)
    assert Trainable({"adapter": {}}).folded(params) is params
    wide = {"blk": {"to_q": {"kernel": np.ones((5, 4), np.float32)}}}
    with pytest.raises(UserError, match="run: made for another UNet"):
        Trainable({"lora": LORA}).folded(wide, where="run")


def test_adapter_collection_and_tokens_match_the_adapter_module():
    params = {"attn2": {"to_k": {"kernel": np.ones((6, 4), np.float32)}, "to_v": {"kernel": np.ones((6, 4), np.float32)}}}
    tree = jax.tree.map(lambda x: x + 1.0, adapter.init(jax.random.key(0), params, embed_dim=3))
    run = Trainable({"adapter": tree}, {"adapter": 0.7})
    collection = run.collections()["adapter"]["attn2"]
    np.testing.assert_allclose(collection["to_v_ip"], 0.7 * np.asarray(tree["attn"]["attn2"]["to_v_ip"]), rtol=1e-6)
    np.testing.assert_array_equal(collection["to_k_ip"], tree["attn"]["attn2"]["to_k_ip"])
    users = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(run.user_tokens(users), adapter.user_tokens(tree, users))
    assert run.user_width == 3


def test_scales_of_a_run_config():
    assert scales_of({"lora": {"rank": 4, "alpha": 8.0}, "psa": {"scale": 0.5}}) == {"lora": 2.0, "adapter": 0.5}
    assert scales_of({"lora": {"rank": 4, "alpha": None}}) == {"lora": 1.0, "adapter": 1.0}  # alpha None = rank
    assert scales_of({}) == {"lora": 1.0, "adapter": 1.0}
    recorded = {"lora": {"rank": 4, "alpha": 8.0}, "trainable": {"kind": "delta", "scales": {"delta": 1.0}}}
    assert scales_of(recorded) == {"delta": 1.0}
    assert record(Trainable({"lora": LORA, "adapter": {}}, {"lora": 0.5})) == {
        "kind": "lora+adapter", "scales": {"lora": 0.5, "adapter": 1.0}}
    assert Trainable({"lora": LORA}, {"lora": 0.25}).lora_rank_alpha() == (2, 0.5)


def test_saved_results_record_their_kind_and_old_runs_still_read(tmp_path):
    base = {"path": "unet", "sha256": "0"}
    save_trained(str(tmp_path / "merged"), Trainable({"lora": LORA}), {"merge": {"method": "ties"}}, base)
    merged = load_trained(str(tmp_path / "merged"))
    assert merged.config["trainable"] == {"kind": "lora", "scales": {"lora": 1.0}}
    assert merged.lora_scale == 1.0 and "lora" not in merged.config
    save_trained(str(tmp_path / "dict"), {"lora": LORA}, {"lora": {"rank": 2, "alpha": 6.0}}, base)
    assert load_trained(str(tmp_path / "dict")).config["trainable"]["scales"] == {"lora": 3.0}
    # a run written before kinds were recorded: the made-up rank = alpha config reads back as 1,
    # a training run's alpha / rank as its scale
    for name, config, scale in (("old_merge", {"lora": {"rank": 2, "alpha": 2.0}}, 1.0),
                                ("old_train", {"lora": {"rank": 2, "alpha": 1.0}, "psa": {"scale": 0.3}}, 0.5)):
        ckpts = Checkpoints(str(tmp_path / name), keep=1, async_save=False)
        ckpts.save(1, {"step": np.int32(1), "trainable": {"lora": LORA}}, config, {}, base)
        ckpts.close()
        run = load_trained(str(tmp_path / name))
        assert run.lora_scale == scale and run.trainable.kind == "lora"
        np.testing.assert_array_equal(run.unet_variables()["lora"]["blk"]["to_q"]["b"], scale * B)
    assert load_trained(str(tmp_path / "old_train")).adapter_scale == 0.3
