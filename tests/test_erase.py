"""Closed-form cross-attention editing (safealign_jax.erase): exact source -> target mapping when
unconstrained, preserved outputs kept (exactly on a disjoint subspace, nearly with a large weight),
a hand-computed 2x2 case, fold / SVD round trip, layer selection and its errors, and the token
alignment of `prompt_states` on the tiny SD pipeline (equal and unequal token counts, "")."""

import numpy as np
import pytest
from flax import traverse_util

from safealign_jax import UserError, erase, lora, merge

D = 8
KEYED = {("blk", "attn2", "to_k"), ("blk", "attn2", "to_v")}


def random_params(seed: int = 0) -> dict:
    """A params tree with text-keyed layers (D -> 5), a cross-attention query (7 -> 5) and a
    self-attention query (6 -> 6), plus a bias that is not a kernel."""
    rng = np.random.default_rng(seed)
    shapes = {("blk", "attn2", "to_k"): (D, 5), ("blk", "attn2", "to_v"): (D, 5),
              ("blk", "attn2", "to_q"): (7, 5), ("blk", "attn1", "to_q"): (6, 6)}
    flat = {(*p, "kernel"): rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
    flat[("blk", "attn2", "to_k", "bias")] = np.zeros(5, np.float32)
    return traverse_util.unflatten_dict(flat)


def layers(delta: dict) -> dict:
    return {p[:-1]: np.asarray(v, np.float64) for p, v in traverse_util.flatten_dict(delta).items()}


def kernel(params, path) -> np.ndarray:
    return np.asarray(params[path[0]][path[1]][path[2]]["kernel"], np.float64)


def test_unconstrained_edit_maps_each_source_to_its_target():
    params = random_params()
    rng = np.random.default_rng(1)
    sources = rng.standard_normal((3, D)).astype(np.float32)  # 3 independent rows < D
    targets = rng.standard_normal((3, D)).astype(np.float32)
    delta = layers(erase.solve_edit(params, sources, targets, None, ridge=1e-9))
    assert set(delta) == KEYED
    for path, d in delta.items():
        w = kernel(params, path)
        assert d.shape == w.shape
        np.testing.assert_allclose(sources @ (w + d), targets @ w, atol=1e-5)


def test_preserved_outputs_kept():
    params = random_params()
    rng = np.random.default_rng(2)
    sources = np.zeros((2, D), np.float32)
    sources[:, :3] = rng.standard_normal((2, 3))  # sources span e0..e2
    targets = rng.standard_normal((2, D)).astype(np.float32)
    preserved = np.zeros((4, D), np.float32)
    preserved[:, 3:] = rng.standard_normal((4, D - 3))  # preserved rows span e3..e7
    delta = layers(erase.solve_edit(params, sources, targets, preserved, ridge=1e-9))
    for path, d in delta.items():
        w = kernel(params, path)
        np.testing.assert_allclose(preserved @ d, 0.0, atol=1e-12)  # disjoint: untouched exactly
        np.testing.assert_allclose(sources @ (w + d), targets @ w, atol=1e-5)

    overlapping = rng.standard_normal((4, D)).astype(np.float32)
    moved = {w: layers(erase.solve_edit(params, sources, targets, overlapping, preserve_weight=w))
             for w in (0.0, 1e4)}
    for path in KEYED:
        free = np.linalg.norm(overlapping @ moved[0.0][path])
        assert free > 0.1
        assert np.linalg.norm(overlapping @ moved[1e4][path]) < 1e-3 * free


def test_hand_computed_2x2():
    params = {"attn2": {"to_k": {"kernel": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}}}
    source, target = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    # A = C^T C + r I = diag(2, 1); C^T (C* - C) W = [[-1, 1], [0, 0]] W = [[2, 2], [0, 0]]
    delta = erase.solve_edit(params, source, target, None, ridge=1.0)["attn2"]["to_k"]["delta"]
    np.testing.assert_allclose(delta, [[1.0, 1.0], [0.0, 0.0]], atol=1e-7)
    # + preserved row [1, 1], lambda 1: A = [[3, 1], [1, 2]], A^{-1} = [[2, -1], [-1, 3]] / 5
    delta = erase.solve_edit(params, source, target, np.array([[1.0, 1.0]]), ridge=1.0)["attn2"]["to_k"]["delta"]
    np.testing.assert_allclose(delta, [[0.8, 0.8], [-0.4, -0.4]], atol=1e-7)
    assert delta.dtype == np.float32
    assert erase.delta_norm({"a": {"delta": delta}, "b": {"delta": np.array([[0.0, 0.4]])}}) == pytest.approx(
        np.sqrt(2 * 0.64 + 2 * 0.16 + 0.16), rel=1e-6)


def test_fold_and_svd_round_trip():
    params = random_params()
    rng = np.random.default_rng(3)
    delta = erase.solve_edit(params, rng.standard_normal((2, D)), rng.standard_normal((2, D)),
                             rng.standard_normal((3, D)), preserve_weight=0.5)
    folded = traverse_util.flatten_dict(lora.fold_delta(params, delta))
    for path, d in layers(delta).items():
        np.testing.assert_allclose(folded[(*path, "kernel")], kernel(params, path) + d, atol=1e-6)
    tree, errors = merge.to_lora(delta, 2)  # two source rows: every delta has rank <= 2
    assert max(errors.values()) < 1e-5
    refolded = traverse_util.flatten_dict(lora.fold(params, tree, 1.0))
    for path, value in folded.items():
        np.testing.assert_allclose(refolded[path], value, atol=1e-5)


def test_layer_selection_and_errors():
    params = random_params()
    rows = np.eye(D)[:2]
    only_k = erase.solve_edit(params, rows, rows[::-1], None, layers=r"attn2/to_k$")
    assert set(layers(only_k)) == {("blk", "attn2", "to_k")}
    cases = [
        (dict(layers=r"attn2/to_q$"), "reads inputs of width 7"),
        (dict(layers=r"nothing_here"), "matches no Dense layer"),
        (dict(layers=r"("), "not a valid regular expression"),
        (dict(ridge=0.0), "ridge=0.0 is invalid"),
        (dict(preserve_weight=-1.0), "preserve_weight=-1.0 is invalid"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            erase.solve_edit(params, rows, rows[::-1], None, **kwargs)
    with pytest.raises(UserError, match="must be the same non-empty"):
        erase.solve_edit(params, rows, rows[:1], None)
    with pytest.raises(UserError, match="preserved has width 3"):
        erase.solve_edit(params, rows, rows, np.ones((2, 3)))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from pipelines import build_sd

    from safealign_jax.pipeline import load_pipeline

    return load_pipeline(build_sd(tmp_path_factory.mktemp("erase")))


def test_prompt_states_alignment(pipe):
    from safealign_jax.pipeline import encode_prompts

    # tiny tokenizer: "the", "cat" are one token each, "dog" three (d, o, g); 16 positions
    assert erase.token_counts(pipe, ["cat", "the", "the cat", "dog", ""]) == [3, 3, 4, 5, 2]
    states = {p: np.asarray(s) for p, s in zip(["cat", "the", "the cat", "dog", ""],
                                               encode_prompts(pipe, ["cat", "the", "the cat", "dog", ""])[0],
                                               strict=True)}
    src, tgt = erase.prompt_states(pipe, ["cat"], ["the"])  # equal counts: all 16 positions
    np.testing.assert_allclose(src, states["cat"], atol=1e-6)
    np.testing.assert_allclose(tgt, states["the"], atol=1e-6)
    src, tgt = erase.prompt_states(pipe, ["the cat", "cat"], ["dog", ""])
    # "the cat" from its last content token (2) vs "dog" from 3: 13 rows; "cat" from 1 vs "" from BOS: 15
    np.testing.assert_allclose(src, np.concatenate([states["the cat"][2:15], states["cat"][1:16]]), atol=1e-6)
    np.testing.assert_allclose(tgt, np.concatenate([states["dog"][3:16], states[""][0:15]]), atol=1e-6)
    kept = erase.preserved_states(pipe, ["the cat", "dog"])
    np.testing.assert_allclose(kept, np.concatenate([states["the cat"], states["dog"]]), atol=1e-6)
    with pytest.raises(UserError, match="1 source prompts but 2 targets"):
        erase.prompt_states(pipe, ["cat"], ["the", "dog"])


def test_edit_from_prompts_moves_the_concept_and_trades_off_preservation(pipe):
    flat = traverse_util.flatten_dict(pipe.unet_params)
    src, tgt = erase.prompt_states(pipe, ["cat"], ["dog"])  # 16 rows < D = 32
    kept = erase.preserved_states(pipe, ["the", "the dog"])

    def errors(delta):
        """(edit error / before, preserved drift / preserved output), worst layer."""
        edit, drift = [], []
        for path, d in layers(delta).items():
            w = np.asarray(flat[(*path, "kernel")], np.float64)
            edit.append(np.linalg.norm(src @ (w + d) - tgt @ w) / np.linalg.norm(src @ w - tgt @ w))
            drift.append(np.linalg.norm(kept @ d) / np.linalg.norm(kept @ w))
        return max(edit), max(drift)

    free = erase.edit_from_prompts(pipe, pipe.unet_params, [("cat", "dog")], [], ridge=1e-6)
    cross_kv = {p[:-1] for p in flat if p[-1] == "kernel" and p[-3:-1] in (("attn2", "to_k"), ("attn2", "to_v"))}
    assert set(layers(free)) == cross_kv and len(cross_kv) == 8  # 4 cross-attentions (down, mid, up x2)
    assert errors(free)[0] < 1e-3
    loose, tight = (errors(erase.edit_from_prompts(pipe, pipe.unet_params, [("cat", "dog")], ["the", "the dog"],
                                                   preserve_weight=w)) for w in (0.01, 100.0))
    assert loose[0] < tight[0] and tight[1] < loose[1]
    assert tight[1] < 0.05
