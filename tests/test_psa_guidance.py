"""Classifier-free guidance with a PSA adapter (docs/METHODS.md section 3): the unconditional branch uses
the negative prompt and proj(zero vector), the conditional one the user's embedding."""

import jax
import numpy as np
import pytest
from pipelines import build_sd

from safealign_jax import adapter
from safealign_jax.errors import UserError
from safealign_jax.pipeline import generate, load_pipeline

EMBED = 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = load_pipeline(build_sd(tmp_path_factory.mktemp("guidance")))
    tree = adapter.init(jax.random.key(0), pipe.unet_params, EMBED)
    rng = np.random.default_rng(0)
    tree["proj"]["bias"] = rng.standard_normal(tree["proj"]["bias"].shape).astype(np.float32)  # proj(0) != 0
    tree["attn"] = jax.tree.map(lambda w: rng.standard_normal(w.shape).astype(np.float32) * 0.5, tree["attn"])
    return pipe, tree


def run(pipe, tree, users, guidance, scale=1.0):
    return generate(pipe, ["a cat"] * len(users), [0] * len(users), num_steps=2, guidance=guidance,
                    adapter=(tree, scale), user_embeddings=np.asarray(users, np.float32), return_latents=True)


def test_unconditional_branch_uses_the_zero_user(pipe):
    pipe, tree = pipe
    users = np.random.default_rng(1).standard_normal((2, EMBED)) * 3
    uncond = run(pipe, tree, users, guidance=0.0)  # the unconditional prediction alone
    np.testing.assert_array_equal(uncond[0], uncond[1])  # does not see the user
    base = run(pipe, tree, users, guidance=0.0, scale=0.0)  # lambda = 0: the base UNet
    assert np.abs(base[0] - uncond[0]).max() > 1e-3  # proj(0) goes through the adapter
    guided = run(pipe, tree, users, guidance=7.5)
    assert np.abs(guided[0] - guided[1]).max() > 1e-3  # the conditional branch sees the user


def test_adapter_without_users_is_refused(pipe):
    pipe, tree = pipe
    with pytest.raises(UserError, match="needs user_embeddings"):
        generate(pipe, ["a cat"], [0], num_steps=1, adapter=(tree, 1.0))
