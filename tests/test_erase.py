"""Closed-form cross-attention editing (safealign_jax.erase): exact source -> target mapping when
unconstrained, preserved outputs kept (exactly on a disjoint subspace, nearly with a large weight),
a hand-computed 2x2 case, fold / SVD round trip, layer selection and its errors, the token
alignment of `prompt_states` on the tiny SD pipeline (equal and unequal token counts, ""), and
scripts/erase.py end to end (delta run folds and equals the library's edit; SVD run exports as a
peft LoRA; one-line user errors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from safealign_jax import UserError, erase, lora, merge
from safealign_jax.trained import load_trained

ROOT = Path(__file__).resolve().parents[1]

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
    # the map itself: X = A^{-1} C^T (C* - C) = [[-2, 2], [1, -1]] / 5, and delta = X W
    x = erase.edit_map(source, target, np.array([[1.0, 1.0]]), ridge=1.0)
    np.testing.assert_allclose(x, [[-0.4, 0.4], [0.2, -0.2]], atol=1e-12)
    # C X = [-0.4, 0.4] of the wanted [-1, 1]: residual 0.6; P X = [-0.2, 0.2] of |P| = sqrt 2: 0.2
    fit = erase.edit_fit(source, target, np.array([[1.0, 1.0]]), x)
    assert fit == {"residual": pytest.approx(0.6), "preserved_change": pytest.approx(0.2)}
    # without the preserved row: X = [[-0.5, 0.5], [0, 0]], residual 0.5; an exact map: 0
    assert erase.edit_fit(source, target, None, erase.edit_map(source, target, None, ridge=1.0)) == {
        "residual": pytest.approx(0.5)}
    assert erase.edit_fit(source, target, None, erase.edit_map(source, target, None, ridge=1e-12))["residual"] < 1e-9
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
def pipeline_dir(tmp_path_factory) -> str:
    from pipelines import build_sd

    return build_sd(tmp_path_factory.mktemp("erase"))


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    from safealign_jax.pipeline import load_pipeline

    return load_pipeline(pipeline_dir)


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


def script(name, config, workdir, *overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / f"scripts/{name}.py"), "--config", str(ROOT / config),
                           f"--workdir={workdir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_erase_script_writes_a_run_that_folds_and_exports(pipe, pipeline_dir, tmp_path):
    """~40 s on 2 cores (4 subprocesses): two edits, an SVD export as a peft LoRA, a user error."""
    from safealign_jax.convert.lora_files import load_lora_file

    (tmp_path / "edits.csv").write_text('source,target\ncat,dog\n"the cat",\n')
    (tmp_path / "keep.txt").write_text("the\nthe dog\n")
    files = [f"--config.model={pipeline_dir}", f"--config.edits={tmp_path / 'edits.csv'}",
             f"--config.preserve={tmp_path / 'keep.txt'}", "--config.preserve_weight=0.5"]
    result = script("erase", "configs/erase.py", tmp_path / "erase", *files)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["edits"], summary["preserved"], summary["form"]) == (2, 2, "delta")
    run = load_trained(str(tmp_path / "erase"))
    expected = erase.edit_from_prompts(pipe, pipe.unet_params, [("cat", "dog"), ("the cat", "")], ["the", "the dog"],
                                       preserve_weight=0.5)
    got, want = layers(run.delta), layers(expected)
    assert got.keys() == want.keys() and len(got) == 8
    for path, value in got.items():
        np.testing.assert_allclose(value, want[path], rtol=1e-5, atol=1e-6)
    assert summary["delta_norm"] == pytest.approx(erase.delta_norm(expected), rel=1e-5)
    rows = erase.rows_from_prompts(pipe, [("cat", "dog"), ("the cat", "")], ["the", "the dog"])
    fit = erase.edit_fit(*rows, erase.edit_map(*rows, preserve_weight=0.5))
    assert summary["fit"] == pytest.approx(fit, rel=1e-4) and 0 < fit["residual"] < 1
    assert run.base_model["path"] == os.path.join(pipeline_dir, "unet")
    folded = traverse_util.flatten_dict(run.folded(pipe.unet_params))
    for path, value in got.items():
        np.testing.assert_allclose(folded[(*path, "kernel")],
                                   np.asarray(traverse_util.flatten_dict(pipe.unet_params)[(*path, "kernel")]) + value,
                                   atol=1e-6)

    result = script("erase", "configs/erase.py", tmp_path / "svd", *files, "--config.output.form=svd",
                    "--config.output.rank=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["max_relative_error"] < 1
    exported = script("export", "configs/export.py:peft", tmp_path / "peft", f"--config.checkpoint={tmp_path / 'svd'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    tree, rank, alpha = load_lora_file(str(tmp_path / "peft" / "lora.safetensors"), pipe.unet_params)
    assert (rank, alpha) == (4, 4.0)
    svd = traverse_util.flatten_dict(load_trained(str(tmp_path / "svd")).lora)
    for path, value in traverse_util.flatten_dict(tree).items():
        np.testing.assert_allclose(np.asarray(value), svd[path], rtol=1e-6)

    (tmp_path / "bad.csv").write_text("prompt,target\ncat,dog\n")
    result = script("erase", "configs/erase.py", tmp_path / "out", f"--config.model={pipeline_dir}",
                    f"--config.edits={tmp_path / 'bad.csv'}")
    assert result.returncode == 2 and "bad.csv: no source column" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_read_edits(tmp_path):
    (tmp_path / "edits.csv").write_text('source,target,note\nnudity,dress,x\n"a bloody knife", ,\n')
    assert erase.read_edits(str(tmp_path / "edits.csv")) == [("nudity", "dress"), ("a bloody knife", "")]
    cases = {"missing.csv": None, "bad.csv": "prompt,target\ncat,dog\n", "empty.csv": "source,target\n",
             "blank.csv": "source,target\n ,dog\n", "short.csv": "source,target\ncat\n"}
    messages = {"missing.csv": "missing.csv: file not found", "bad.csv": "bad.csv: no source column",
                "empty.csv": "empty.csv: no edits", "blank.csv": "blank.csv:2: empty source",
                "short.csv": "short.csv:2: row does not have the 2 fields"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=messages[name]):
            erase.read_edits(str(tmp_path / name))
