"""`lora.init_from`: a run starts from the rank-r fit of a delta run (e.g. a closed-form edit) or
of another LoRA run, instead of from zero."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from train_helper import tiny_config

from safealign_jax import UserError, adapter, lora
from safealign_jax.runs import hash_folder, save_trained
from safealign_jax.train.loop import initial_lora


def _config(unet_dir, init_from):
    return tiny_config({"model.path": unet_dir, "lora.rank": 2, "lora.alpha": 4.0, "lora.init_from": init_from})


def test_a_run_starts_at_the_fit_of_a_delta_or_lora_run(tmp_path, tiny_unet_dir, tiny_unet):
    _, params = tiny_unet
    base = {"path": tiny_unet_dir, "sha256": hash_folder(tiny_unet_dir)}
    kernels = traverse_util.flatten_dict(params)
    path = tuple(lora.targets(params)[0].split("/"))
    rng = np.random.default_rng(1)
    rank_two = rng.standard_normal((kernels[(*path, "kernel")].shape[0], 2)) @ rng.standard_normal(
        (2, kernels[(*path, "kernel")].shape[1]))
    delta_run = str(tmp_path / "edit")
    save_trained(delta_run, {"delta": traverse_util.unflatten_dict({(*path, "delta"): rank_two})}, {}, base)
    config = _config(tiny_unet_dir, delta_run)
    start = initial_lora(config, params)
    product = traverse_util.flatten_dict(lora.delta(start, 2.0))
    np.testing.assert_allclose(product[(*path, "delta")], rank_two, atol=1e-4)
    assert set(traverse_util.flatten_dict(start)) == set(traverse_util.flatten_dict(
        lora.init(jax.random.key(0), params, lora.LoRAConfig(rank=2))))

    # a LoRA run (rank 2, alpha 2: scale 1) is continued as the same product at scale 2
    other = lora.init(jax.random.key(5), params, lora.LoRAConfig(rank=2))
    other = jax.tree.map(lambda x: x + 0.1, other)
    lora_run = str(tmp_path / "lora")
    save_trained(lora_run, {"lora": other}, {"lora": {"rank": 2, "alpha": 2.0}}, base)
    continued = initial_lora(_config(tiny_unet_dir, lora_run), params)
    expected = traverse_util.flatten_dict(lora.delta(other, 1.0))
    got = traverse_util.flatten_dict(lora.delta(continued, 2.0))
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-4)

    # without init_from: lora.init's fresh tree
    fresh = initial_lora(_config(tiny_unet_dir, ""), params)
    assert all(np.all(np.asarray(x) == 0) for p, x in traverse_util.flatten_dict(fresh).items() if p[-1] == "b")


def test_init_from_a_run_without_lora_or_delta_is_refused(tmp_path, tiny_unet_dir, tiny_unet):
    _, params = tiny_unet
    base = {"path": tiny_unet_dir, "sha256": hash_folder(tiny_unet_dir)}
    run = str(tmp_path / "adapter")
    save_trained(run, {"adapter": adapter.init(jax.random.key(1), params, 8, 1)}, {"psa": {"scale": 1.0}}, base)
    with pytest.raises(UserError, match="holds no LoRA or delta"):
        initial_lora(_config(tiny_unet_dir, run), params)
