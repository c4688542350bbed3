"""User-gated PSA and N = 2 user tokens as diffusers reads them: the gated export (one peft LoRA per
category + psa_gate.safetensors) served with the README recipe, the scripts on a gated run, and
the paper's adapter with two user tokens (IP-Adapter file, sampling)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline  # noqa: E402
from flax import traverse_util  # noqa: E402
from pipelines import build_sd  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch_reference import nchw, nhwc, relative_error  # noqa: E402

from safealign_jax import adapter, gated  # noqa: E402
from safealign_jax.convert import adapter_files, gated_files  # noqa: E402
from safealign_jax.models import load_unet  # noqa: E402
from safealign_jax.pipeline import generate, load_pipeline  # noqa: E402
from safealign_jax.runs import save_trained  # noqa: E402
from safealign_jax.trained import load_trained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBED = 10
CATEGORIES = ["Hate", "Self-Harm", "Violence"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipeline folder, flax module, params, inputs (x, t, context)) of the tiny SD pipeline."""
    folder = build_sd(tmp_path_factory.mktemp("gated_sd"))
    module, params = load_unet(folder)
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 8, 8, 4), np.float32), np.array([3, 911], np.int32),
              rng.standard_normal((2, 5, 32), np.float32))
    return folder, module, params, inputs


def random_gated(params, rank=None) -> dict:
    """A gated tree over random deltas on every attn2 to_k / to_v, with user-dependent gates."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(1)
    deltas = [traverse_util.unflatten_dict({
        (*p[:-1], "delta"): 0.3 * rng.standard_normal(v.shape).astype(np.float32)
        for p, v in flat.items() if p[-1] == "kernel" and "attn2" in p and p[-2] in ("to_k", "to_v")})
        for _ in CATEGORIES]
    tree = gated.init(deltas, EMBED, rank=rank, init_bias=-0.5, key=jax.random.key(2))
    tree["gate"]["kernel"] = tree["gate"]["kernel"] * 100
    return tree


def torch_predict(unet, inputs, image_embeds=None):
    x, t, context = inputs
    kwargs = {}
    if image_embeds is not None:
        kwargs["added_cond_kwargs"] = {"image_embeds": [torch.from_numpy(image_embeds)[:, None]]}
    with torch.no_grad():
        return nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample)


def diffusers_recipe(pipe, folder: str, e: np.ndarray) -> list[float]:
    """The README recipe, verbatim: gates from psa_gate.safetensors, one adapter per category."""
    gate = load_file(f"{folder}/psa_gate.safetensors")
    with safe_open(f"{folder}/psa_gate.safetensors", "pt") as f:
        cats = json.loads(f.metadata()["categories"])
        hard = f.metadata().get("gates") == "hard"
    g = torch.sigmoid(gate["weight"] @ torch.from_numpy(e) + gate["bias"])
    g = (g > 0.5).float() if hard else g
    for c in cats:
        pipe.load_lora_weights(folder, weight_name=f"{c}.safetensors", adapter_name=c)
    pipe.set_adapters(cats, adapter_weights=g.tolist())
    return g.tolist()


def test_gated_export_served_by_diffusers_matches_ours(sd, tmp_path):
    folder, module, params, inputs = sd
    tree = random_gated(params)
    out = tmp_path / "gated"
    summary = gated_files.save_gated(str(out), tree, CATEGORIES)
    assert summary["categories"] == ["hate", "self_harm", "violence"] and summary["rank"] == 32
    users = np.random.default_rng(3).standard_normal((2, EMBED)).astype(np.float32)
    g = np.asarray(gated.gates(tree, users))
    assert np.abs(g[0] - g[1]).max() > 0.3
    base = np.asarray(module.apply({"params": params}, *inputs))
    for u in users:
        pipe = DiffusionPipeline.from_pretrained(folder)
        weights = diffusers_recipe(pipe, str(out), u)
        np.testing.assert_allclose(weights, np.asarray(gated.gates(tree, u[None]))[0], rtol=1e-5)
        ours = np.asarray(module.apply({"params": gated.fold_for_user(params, tree, u)}, *inputs))
        err = relative_error(ours, torch_predict(pipe.unet, inputs))
        print(f"gated user: relative max abs error {err:.2e}")
        assert err <= 1e-4
        assert relative_error(ours, base) > 1e-2  # the deltas act
    back = gated_files.load_gated(str(out), params)
    np.testing.assert_array_equal(back["gate"]["kernel"], np.asarray(tree["gate"]["kernel"]))
    np.testing.assert_array_equal(back["gate"]["bias"], np.asarray(tree["gate"]["bias"]))
    for ours, theirs in zip(gated.category_deltas(tree), gated.category_deltas(back), strict=True):
        for (p, x), (q, y) in zip(traverse_util.flatten_dict(ours).items(),
                                  sorted(traverse_util.flatten_dict(theirs).items()), strict=True):
            assert p == q
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_hard_gates_served_by_diffusers_match_ours(sd, tmp_path):
    """psa.gated.hard: the export says "gates": "hard", the recipe switches each category fully on
    or off, and diffusers' UNet equals ours folded with the thresholded gates."""
    folder, module, params, inputs = sd
    tree = random_gated(params)
    gated_files.save_gated(str(tmp_path), tree, CATEGORIES, hard=True)
    user = np.random.default_rng(3).standard_normal(EMBED).astype(np.float32)
    hard = np.asarray(gated.gates(tree, user[None], hard=True))[0]
    assert set(hard.tolist()) == {0.0, 1.0}
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert diffusers_recipe(pipe, str(tmp_path), user) == hard.tolist()
    ours = np.asarray(module.apply({"params": gated.fold_for_user(params, tree, user, hard=True)}, *inputs))
    assert relative_error(ours, torch_predict(pipe.unet, inputs)) <= 1e-4


def test_low_rank_tree_round_trips_exactly(sd, tmp_path):
    _, _, params, _ = sd
    tree = random_gated(params, rank=3)
    gated_files.save_gated(str(tmp_path), tree, CATEGORIES)
    back = gated_files.load_gated(str(tmp_path), params)
    assert jax.tree.structure(back) == jax.tree.structure(jax.device_get(tree))
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


def script(name: str, config: str, workdir, *overrides):
    result = subprocess.run([sys.executable, str(ROOT / f"scripts/{name}.py"), "--config",
                             str(ROOT / f"configs/{config}"), "--workdir", str(workdir), *overrides],
                            capture_output=True, text=True, timeout=600)
    return result


@pytest.mark.slow
def test_scripts_export_and_sample_a_gated_run(sd, tmp_path):
    """A gated run saved as a checkpoint: scripts/export.py gated, and scripts/sample.py for a
    user equals `generate` with the UNet folded for that user."""
    folder, _, params, _ = sd
    tree = random_gated(params, rank=4)
    config = {"psa": {"enable": True, "variant": "gated", "embed_dim": EMBED,
                      "gated": {"categories": ",".join(CATEGORIES), "experts": ""}}}
    run = tmp_path / "run"
    save_trained(str(run), {"gated": tree}, config, {"path": f"{folder}/unet", "sha256": ""})
    assert load_trained(str(run)).categories == tuple(CATEGORIES)
    result = script("export", "export.py:gated", tmp_path / "out", f"--config.checkpoint={run}")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "hate.safetensors", "psa_gate.safetensors", "self_harm.safetensors", "violence.safetensors"]
    result = script("export", "export.py:peft", tmp_path / "out2", f"--config.checkpoint={run}")
    assert result.returncode == 2 and "exports only as 'gated'" in result.stderr
    user = np.random.default_rng(4).standard_normal(EMBED).astype(np.float32)
    np.save(tmp_path / "user.npy", user)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    result = script("sample", "sample.py", tmp_path / "images", f"--config.checkpoint={run}",
                    f"--config.model={folder}", f"--config.prompts={tmp_path / 'prompts.txt'}",
                    f"--config.user_embedding={tmp_path / 'user.npy'}", "--config.steps=2",
                    "--config.sampler=ddim", "--config.seed=5")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    written = np.asarray(Image.open(tmp_path / "images" / "00000.png"), np.float32) / 255
    pipe = load_pipeline(folder)
    args = dict(negative_prompts=[""], num_steps=2, sampler="ddim")
    folded = gated.fold_for_user(pipe.unet_params, tree, user)
    expected = generate(pipe, ["a cat"], [5], unet_params=folded, **args)
    assert np.abs(written - expected[0]).max() <= 1.0 / 255 + 1e-6
    latents = generate(pipe, ["a cat"], [5], unet_params=folded, return_latents=True, **args)
    base = generate(pipe, ["a cat"], [5], return_latents=True, **args)
    assert np.abs(latents - base).max() > 1e-4 * np.abs(base).max()  # the user's deltas act (measured 1.1e-3)
    record = json.loads((tmp_path / "images" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["categories"] == CATEGORIES


def random_adapter(params, tokens: int) -> dict:
    tree = adapter.init(jax.random.key(2), params, embed_dim=EMBED, num_tokens=tokens)
    tree["attn"] = jax.tree.map(lambda v: jax.random.normal(jax.random.key(7), v.shape) * 0.2, tree["attn"])
    return tree


def test_two_user_tokens_in_diffusers(sd, tmp_path):
    """N = 2: the IP-Adapter export equals our UNet in diffusers and reads back as N = 2."""
    folder, module, params, inputs = sd
    tree = random_adapter(params, 2)
    path = tmp_path / "psa.safetensors"
    assert adapter_files.save_ip_adapter(str(path), tree, params)["tokens"] == 2
    users = np.random.default_rng(5).standard_normal((2, EMBED)).astype(np.float32)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    ours = np.asarray(module.apply({"params": params, "adapter": adapter.variables(tree)}, *inputs,
                                   user_tokens=adapter.user_tokens(tree, jnp.asarray(users))))
    err = relative_error(ours, torch_predict(pipe.unet, inputs, users))
    print(f"N=2 ip-adapter: relative max abs error {err:.2e}")
    assert err <= 1e-4
    loaded = adapter_files.load_ip_adapter(str(path), params)
    assert loaded["proj"]["kernel"].shape == (EMBED, 2 * 32)


@pytest.mark.slow
def test_two_user_tokens_in_sampling(sd):
    """Sampling with two identical user tokens equals one token; with two different ones not."""
    folder = sd[0]
    users = np.random.default_rng(5).standard_normal((2, EMBED)).astype(np.float32)
    flax_pipe = load_pipeline(folder)
    one = random_adapter(flax_pipe.unet_params, 1)
    d = one["norm"]["scale"].shape[0]
    doubled = {**one, "proj": {"kernel": jnp.tile(one["proj"]["kernel"], (1, 2)),
                               "bias": jnp.tile(one["proj"]["bias"], 2)}}
    assert doubled["proj"]["kernel"].shape == (EMBED, 2 * d)
    two = random_adapter(flax_pipe.unet_params, 2)
    args = dict(negative_prompts=["", ""], num_steps=2, sampler="ddim", user_embeddings=users, return_latents=True)
    prompts, seeds = ["a cat", "a dog"], [0, 1]
    single = generate(flax_pipe, prompts, seeds, adapter=(one, 1.0), **args)
    copies = generate(flax_pipe, prompts, seeds, adapter=(doubled, 1.0), **args)
    distinct = generate(flax_pipe, prompts, seeds, adapter=(two, 1.0), **args)
    np.testing.assert_allclose(copies, single, atol=1e-5 * np.abs(single).max())
    assert np.abs(distinct - single).max() > 1e-3 * np.abs(single).max()
