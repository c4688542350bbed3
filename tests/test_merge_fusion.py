"""Least-squares fusion of experts' text-keyed layers (merge.fuse / merge.combine), and Co-Merge
with own-category statistics (merge.calibrate with one batch list per expert)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from safealign_jax import UserError, lora, merge
from safealign_jax.models.layers import Dense

D = 8
KEYED = (("blk", "attn2", "to_k"), ("blk", "attn2", "to_v"))
SHAPES = {KEYED[0]: (D, 5), KEYED[1]: (D, 6), ("blk", "attn1", "to_q"): (6, 6)}


def params_and_experts(rank: int = 2):
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({(*p, "kernel"): rng.standard_normal(s).astype(np.float32)
                                           for p, s in SHAPES.items()})
    experts = [traverse_util.unflatten_dict(
        {(*p, "a"): rng.standard_normal((s[0], rank)).astype(np.float32) for p, s in SHAPES.items()}
        | {(*p, "b"): rng.standard_normal((rank, s[1])).astype(np.float32) for p, s in SHAPES.items()})
        for _ in range(2)]
    return params, experts


def subspace_rows(rng, count: int, dims: slice) -> np.ndarray:
    rows = np.zeros((count, D), np.float32)
    rows[:, dims] = rng.standard_normal((count, dims.stop - dims.start))
    return rows


def flat(tree) -> dict:
    return {p[:-1]: np.asarray(v, np.float64) for p, v in traverse_util.flatten_dict(tree).items()}


def test_fusion_keeps_each_experts_own_concepts_and_the_preserved_outputs():
    params, experts = params_and_experts()
    scales = [0.5, 2.0]
    rng = np.random.default_rng(1)
    concepts = [subspace_rows(rng, 3, slice(0, 3)), subspace_rows(rng, 2, slice(3, 5))]
    preserved = subspace_rows(rng, 2, slice(5, 8))
    deltas = [flat(lora.delta(t, s)) for t, s in zip(experts, scales, strict=True)]
    fused = flat(merge.fuse(params, experts, concepts, preserved, scales=scales, ridge=1e-9))
    assert {p: v.shape for p, v in fused.items()} == {p: SHAPES[p] for p in KEYED}
    for path in KEYED:
        for rows, delta in zip(concepts, deltas, strict=True):
            np.testing.assert_allclose(rows @ fused[path], rows @ delta[path], atol=1e-5)
        np.testing.assert_allclose(preserved @ fused[path], 0.0, atol=1e-10)
    # delta trees in, same result; averaging would only give each expert's mapping by halves
    as_deltas = [lora.delta(t, s) for t, s in zip(experts, scales, strict=True)]
    again = flat(merge.fuse(params, as_deltas, concepts, preserved, ridge=1e-9))
    for path in KEYED:
        np.testing.assert_allclose(again[path], fused[path], atol=1e-6)


def test_fusion_with_overlapping_preserved_rows_keeps_them_nearly():
    params, experts = params_and_experts()
    rng = np.random.default_rng(2)
    concepts = [rng.standard_normal((2, D)), rng.standard_normal((2, D))]
    preserved = rng.standard_normal((3, D))
    free, tight = (flat(merge.fuse(params, experts, concepts, preserved, preserve_weight=w)) for w in (0.0, 1e4))
    for path in KEYED:
        assert np.linalg.norm(preserved @ tight[path]) < 1e-3 * np.linalg.norm(preserved @ free[path])


def test_combine_takes_the_other_layers_from_another_merge():
    params, experts = params_and_experts()
    rng = np.random.default_rng(3)
    fused = merge.fuse(params, experts, [rng.standard_normal((2, D)), rng.standard_normal((2, D))], None)
    average = merge.linear(experts, [1.0, 1.0])
    combined = flat(merge.combine(fused, average))
    assert set(combined) == set(SHAPES)
    for path, value in flat(fused).items():
        np.testing.assert_array_equal(combined[path], value)
    np.testing.assert_array_equal(combined[("blk", "attn1", "to_q")], flat(average)[("blk", "attn1", "to_q")])
    with pytest.raises(UserError, match="must be a delta tree"):
        merge.combine(fused, experts[0])


def test_fusion_errors():
    params, experts = params_and_experts()
    rows = [np.eye(D)[:2], np.eye(D)[2:4]]
    self_only = [{"blk": {"attn1": e["blk"]["attn1"]}} for e in experts]
    cases = [
        ((params, self_only, rows, None), "no layer the experts adapt matches"),
        ((params, experts, rows[:1], None), "1 concept-state sets for 2 experts"),
        ((params, experts, [rows[0], np.ones((2, 3))], None), "expert 1 has width 3"),
        ((params, experts, [rows[0], np.zeros((0, D))], None), "expert 1 has no concept states"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            merge.fuse(*args)


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Dense(2, name="l2")(Dense(4, name="l1")(x))


def test_own_category_statistics_let_the_expert_of_the_larger_inputs_win():
    module = Toy()
    x = jax.random.normal(jax.random.key(0), (4, 5, 3))
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    l2_delta = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)), jnp.float32)
    small = {"l2": {"a": jnp.eye(4), "b": l2_delta}}  # its own category's inputs are 10x larger
    large = {"l2": {"a": jnp.eye(4), "b": 2.0 * l2_delta}}
    own_small, own_large = [{"x": 10.0 * x[:2]}, {"x": 10.0 * x[2:]}], [{"x": x[:2]}, {"x": x[2:]}]

    def apply(variables, batch, mutable):
        return module.apply(variables, batch["x"], mutable=mutable)

    shared = merge.calibrate(apply, params, [small, large], None, own_large)
    _, wins = merge.comerge([small, large], None, shared)
    assert wins["l2"] == [0, 8]  # the same inputs: the larger weights win
    own = merge.calibrate(apply, params, [small, large], None, [own_small, own_large])
    hidden = lambda rows: rows @ np.asarray(params["l1"]["kernel"]) + np.asarray(params["l1"]["bias"])  # noqa: E731
    rows = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(own[0]["l2"]), np.abs(hidden(10.0 * rows)).mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(own[1]["l2"]), np.asarray(shared[1]["l2"]), rtol=1e-6)
    merged, wins = merge.comerge([small, large], None, own)
    # |hidden(10 x)| is ~10x |hidden(x)| (the bias is zero-initialised): 10 |dW| beats 2 |dW|
    assert wins["l2"] == [8, 0]
    np.testing.assert_allclose(np.asarray(merged["l2"]["delta"]), np.asarray(l2_delta), rtol=1e-6)
    with pytest.raises(UserError, match="1 calibration batch lists for 2 experts"):
        merge.calibrate(apply, params, [small, large], None, [own_small])


def test_merge_script_fusion(tmp_path):
    """scripts/merge.py :fusion on two random LoRA experts of the tiny SD pipeline (~25 s): the
    cross-attention key / value layers equal `merge.fuse` on the experts' phrases, the other
    layers the average; the summary records the total norm."""
    import json
    import os

    from pipelines import build_sd
    from test_erase import script
    from train_helper import tiny_config

    from safealign_jax import erase
    from safealign_jax.pipeline import load_pipeline
    from safealign_jax.runs import hash_folder, save_trained
    from safealign_jax.trained import load_trained

    pipe = load_pipeline(build_sd(tmp_path))
    unet = str(tmp_path / "sd" / "unet")
    config = tiny_config({"model.path": unet}).to_dict()
    base = {"path": unet, "sha256": hash_folder(unet)}
    trees = []
    for i, name in enumerate(("hate", "violence")):
        tree = lora.init(jax.random.key(i), pipe.unet_params, lora.LoRAConfig(rank=2))
        tree = jax.tree.map(lambda x, k=i: x + 0.05 * jax.random.normal(jax.random.key(10 + k), x.shape), tree)
        save_trained(str(tmp_path / "experts" / name), {"lora": tree}, config, base, step=1)
        trees.append(tree)
    (tmp_path / "concepts.csv").write_text("expert,phrase\nhate,the cat\nviolence,dog\nviolence,the dog\n")
    (tmp_path / "keep.txt").write_text("the\n")
    result = script("merge", "configs/merge.py:fusion", tmp_path / "fused", f"--config.experts={tmp_path / 'experts'}",
                    f"--config.fusion_concepts={tmp_path / 'concepts.csv'}",
                    f"--config.fusion_preserve={tmp_path / 'keep.txt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    fused = flat(load_trained(str(tmp_path / "fused")).delta)
    states = [erase.preserved_states(pipe, p) for p in (["the cat"], ["dog", "the dog"])]
    keyed = flat(merge.fuse(pipe.unet_params, trees, states, erase.preserved_states(pipe, ["the"])))
    average = flat(merge.linear(trees, [1.0, 1.0]))
    assert fused.keys() == average.keys() and len(keyed) == 8
    for path, value in fused.items():
        np.testing.assert_allclose(value, keyed[path] if path in keyed else average[path], rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "fused" / "merge_summary.json").read_text())
    assert summary["method"] == "fusion" and os.path.isdir(summary["checkpoint"])
    assert summary["delta_norm"] == pytest.approx(merge.delta_norm(load_trained(str(tmp_path / "fused")).delta), rel=1e-6)
    bad = script("merge", "configs/merge.py:fusion", tmp_path / "bad", f"--config.experts={tmp_path / 'experts'}")
    assert bad.returncode == 2 and "fusion_concepts is empty" in bad.stderr, bad.stderr[-2000:]
