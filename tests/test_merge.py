"""Merging safety experts (safealign_jax.merge): every method on hand-made LoRA trees, TIES and
Co-Merge against hand-computed results, DARE's expectation, the calibration pass on a toy model
whose second layer sees much larger inputs under one expert, SVD re-factoring, and the errors
for experts that cannot be merged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from safealign_jax import UserError, lora, merge
from safealign_jax.models.layers import Dense

LAYERS = {("down", "attn1", "to_q"): (6, 5), ("up", "attn2", "to_k"): (4, 7)}


def random_lora(seed: int, rank: int = 2, layers=LAYERS) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, (fan_in, fan_out) in layers.items():
        flat[(*path, "a")] = jnp.asarray(rng.standard_normal((fan_in, rank)), jnp.float32)
        flat[(*path, "b")] = jnp.asarray(rng.standard_normal((rank, fan_out)), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def from_matrix(matrix, scale: float = 1.0) -> dict:
    """A full-rank LoRA (a = I) whose delta s a b is `matrix` (in, out) for scale s."""
    matrix = jnp.asarray(matrix, jnp.float32)
    return {"l": {"a": jnp.eye(matrix.shape[0]), "b": matrix / scale}}


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def shapes(tree) -> dict:
    return {k: v.shape for k, v in flat(tree).items()}


@pytest.fixture(scope="module")
def identical():
    tree = random_lora(0)
    return [tree] * 3, [0.5] * 3, lora.delta(tree, 0.5)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare", "comerge", "comerge_row"])
def test_identical_experts_merge_to_that_expert(identical, method):
    trees, scales, expected = identical
    if method == "linear":
        merged = merge.linear(trees, scales)
    elif method == "task_arithmetic":
        merged = merge.task_arithmetic(trees, scales, lam=1 / 3)
    elif method == "ties":
        merged = merge.ties(trees, scales, density=1.0)
    elif method == "dare":
        merged = merge.dare(trees, scales, key=jax.random.key(1), drop=0.0)
    else:
        stats = [{path: jnp.full((n_in,), 1.0 + i) for path, (n_in, _) in LAYERS.items()} for i in range(3)]
        stats = [traverse_util.unflatten_dict(s) for s in stats]
        merged, wins = merge.comerge(trees, scales, stats, "row" if method == "comerge_row" else "weight")
        assert wins == {"/".join(p): [0, 0, n_in * n_out] for p, (n_in, n_out) in LAYERS.items()}  # most active
    assert shapes(merged) == shapes(expected)  # same paths and shapes as the experts' deltas
    for path, value in flat(merged).items():
        np.testing.assert_allclose(value, flat(expected)[path], rtol=1e-6, atol=1e-6)


def test_ties_hand_computed():
    d1 = [[3.0, -1.0], [0.5, 2.0]]
    d2 = [[1.0, 2.0], [-4.0, -1.0]]
    d3 = [[-2.0, 1.5], [1.0, 0.1]]
    # density 0.5 keeps 2 of 4 entries: [[3,0],[0,2]], [[0,2],[-4,0]], [[-2,1.5],[0,0]];
    # elected signs of the sum [[1,3.5],[-4,2]]: + + / - +; disjoint means: 3, (2+1.5)/2, -4, 2.
    trees = [from_matrix(d1, 2.0), from_matrix(d2, 2.0), from_matrix(d3, 2.0)]
    merged = merge.ties(trees, [2.0] * 3, density=0.5, lam=0.5)
    np.testing.assert_allclose(np.asarray(merged["l"]["delta"]), 0.5 * np.array([[3.0, 1.75], [-4.0, 2.0]]),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(merge.trim(jnp.asarray(d3), 0.5)), [[-2.0, 1.5], [0.0, 0.0]])


def test_dare_identity_expectation_and_determinism():
    tree, scale = random_lora(3), 0.5
    expected = flat(lora.delta(tree, scale))
    same = flat(merge.dare([tree], [scale], key=jax.random.key(0), drop=0.0))
    for path, value in same.items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6)
    draws = [flat(merge.dare([tree], [scale], key=jax.random.key(k), drop=0.5)) for k in range(400)]
    for path, value in expected.items():
        kept = np.mean([d[path] != 0 for d in draws])
        assert abs(kept - 0.5) < 0.03
        mean = np.mean([d[path] for d in draws], axis=0)
        # mean of 400 draws of 2 x value x Bernoulli(0.5): standard error |value| / 20
        assert np.all(np.abs(mean - value) <= 4 * np.abs(value) / 20 + 1e-6)
    again = flat(merge.dare([tree], [scale], key=jax.random.key(7), drop=0.5))
    for path, value in flat(merge.dare([tree], [scale], key=jax.random.key(7), drop=0.5)).items():
        np.testing.assert_array_equal(value, again[path])


def test_comerge_selection_hand_computed():
    big = [[4.0, 1.0], [4.0, 1.0]]  # larger weights, but on weakly active inputs
    small = [[1.0, 2.0], [1.0, 0.5]]
    trees = [from_matrix(big), from_matrix(small)]
    stats = [{"l": jnp.array([0.1, 0.1])}, {"l": jnp.array([1.0, 1.0])}]
    merged, wins = merge.comerge(trees, None, stats, "weight")
    # scores: big 0.4 0.1 / 0.4 0.1; small 1 2 / 1 0.5 -> small wins everywhere
    np.testing.assert_array_equal(np.asarray(merged["l"]["delta"]), small)
    assert wins == {"l": [0, 4]}
    stats = [{"l": jnp.array([1.0, 1.0])}, {"l": jnp.array([0.3, 0.3])}]
    merged, wins = merge.comerge(trees, None, stats, "weight")
    # big 4 1 / 4 1; small 0.3 0.6 / 0.3 0.15 -> big everywhere
    np.testing.assert_array_equal(np.asarray(merged["l"]["delta"]), big)
    stats = [{"l": jnp.array([1.0, 1.0])}, {"l": jnp.array([3.0, 3.0])}]
    merged, wins = merge.comerge(trees, None, stats, "weight")
    # big 4 1 / 4 1; small 3 6 / 3 1.5 -> per weight: big, small / big, small
    np.testing.assert_array_equal(np.asarray(merged["l"]["delta"]), [[4.0, 2.0], [4.0, 0.5]])
    assert wins == {"l": [2, 2]}
    merged, wins = merge.comerge(trees, None, stats, "row")
    # per output column j: big 8, 2; small 6, 7.5 -> column 0 big, column 1 small
    np.testing.assert_array_equal(np.asarray(merged["l"]["delta"]), [[4.0, 2.0], [4.0, 0.5]])
    assert wins == {"l": [2, 2]}


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Dense(2, name="l2")(Dense(4, name="l1")(x))


def test_calibration_picks_the_expert_whose_inputs_are_larger():
    module = Toy()
    x = jax.random.normal(jax.random.key(0), (4, 5, 3))
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    rng = np.random.default_rng(0)
    l2_delta = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    loud = {"l1": {"a": jnp.eye(3), "b": 50.0 * jnp.ones((3, 4))}, "l2": {"a": jnp.eye(4), "b": l2_delta}}
    quiet = {"l1": {"a": jnp.eye(3), "b": jnp.zeros((3, 4))}, "l2": {"a": jnp.eye(4), "b": 3.0 * l2_delta}}
    batches = [{"x": x[:2]}, {"x": x[2:]}]

    def apply(variables, batch, mutable):
        return module.apply(variables, batch["x"], mutable=mutable)

    stats = merge.calibrate(apply, params, [loud, quiet], [1.0, 1.0], batches, "mean_abs")
    rows = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(stats[1]["l1"]), np.abs(rows).mean(0), rtol=1e-5)
    hidden_loud = rows @ (np.asarray(params["l1"]["kernel"]) + 50.0) + np.asarray(params["l1"]["bias"])
    np.testing.assert_allclose(np.asarray(stats[0]["l2"]), np.abs(hidden_loud).mean(0), rtol=1e-5)
    rms = merge.calibrate(apply, params, [loud], None, batches, "rms")
    np.testing.assert_allclose(np.asarray(rms[0]["l2"]), np.sqrt((hidden_loud ** 2).mean(0)), rtol=1e-5)
    merged, wins = merge.comerge([loud, quiet], None, stats)
    assert wins["l2"] == [8, 0]  # 3x smaller weights, but ~50x larger inputs
    np.testing.assert_allclose(np.asarray(merged["l2"]["delta"]), np.asarray(l2_delta), rtol=1e-6)


def test_svd_refactoring():
    tree = random_lora(5, rank=2)
    delta = lora.delta(tree, 0.5)
    for rank in (2, 3, 9):  # exact whenever rank >= 2 (9 > min(in, out): zero padding)
        refactored, errors = merge.to_lora(delta, rank)
        assert shapes(refactored) == shapes(random_lora(0, rank=rank))
        assert max(errors.values()) < 1e-5
        for path, value in flat(lora.delta(refactored, 1.0)).items():
            np.testing.assert_allclose(value, flat(delta)[path], atol=1e-5)
    full = {"l": {"delta": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}}
    _, errors = merge.to_lora(full, 1)
    assert errors["l"] == pytest.approx(np.sqrt(5 / 14), rel=1e-5)  # ||(0,2,1)|| / ||(3,2,1)||


def test_mismatched_experts_are_refused():
    base = random_lora(0)
    other_rank = random_lora(1, rank=3)
    with pytest.raises(UserError, match=r"hate has 'down/attn1/to_q/a' of shape \(6, 3\), but sexual has \(6, 2\)"):
        merge.linear([base, other_rank], names=["sexual", "hate"])
    missing = random_lora(1, layers={("down", "attn1", "to_q"): (6, 5)})
    with pytest.raises(UserError, match=r"expert 1 has no 'up/attn2/to_k/a', which expert 0 has"):
        merge.ties([base, missing])
    extra = random_lora(1, layers={**LAYERS, ("mid", "to_v"): (4, 4)})
    with pytest.raises(UserError, match=r"expert 1 has 'mid/to_v/a', which expert 0 has not"):
        merge.dare([base, extra], key=jax.random.key(0))
    bases = [{"path": "/m/sd15", "sha256": "a" * 64}, {"path": "/m/sd15", "sha256": "a" * 64},
             {"path": "/m/sd21", "sha256": "b" * 64}]
    merge.check_same_base(bases[:2])
    with pytest.raises(UserError, match=r"violence was trained on base model '/m/sd21'"):
        merge.check_same_base(bases, ["hate", "sexual", "violence"])
    with pytest.raises(UserError, match="granularity 'column'"):
        merge.comerge([base], None, [{}], "column")
    with pytest.raises(UserError, match=r"drop probability 1\.0"):
        merge.dare([base], key=jax.random.key(0), drop=1.0)
