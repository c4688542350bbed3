"""The PSA user adapter: zero-init equals the base, user dependence, gradients, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safealign_jax import UserError, adapter
from safealign_jax.models import UNet2DConditionModel, UNetConfig

CONFIG = UNetConfig(
    block_out_channels=(32, 64),
    layers_per_block=(1, 1),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)
EMBED = 24


@pytest.fixture(scope="module")
def unet():
    module = UNet2DConditionModel(CONFIG)
    params = module.init(jax.random.key(0), *module.dummy_inputs(size=16, seq_len=5))["params"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4), np.float32))
    t = jnp.array([10, 700])
    context = jnp.asarray(rng.standard_normal((2, 5, 32), np.float32))
    users = jnp.asarray(rng.standard_normal((2, EMBED), np.float32))
    return module, params, (x, t, context), users


def predict(unet, tree, users, scale=1.0):
    module, params, inputs, _ = unet
    return module.apply(
        {"params": params, "adapter": adapter.variables(tree, scale)},
        *inputs, user_tokens=adapter.user_tokens(tree, users),
    )


def test_zero_init_equals_base(unet):
    module, params, inputs, users = unet
    tree = adapter.init(jax.random.key(1), params, EMBED)
    base = module.apply({"params": params}, *inputs)
    np.testing.assert_array_equal(np.asarray(predict(unet, tree, users)), np.asarray(base))


def test_adapter_paths_cover_every_cross_attention(unet):
    _, params, _, _ = unet
    tree = adapter.init(jax.random.key(1), params, EMBED, num_tokens=2)
    # tiny UNet: 1 transformer in the down block, 1 in the mid block, 2 in the up block.
    assert len(adapter.cross_attention_paths(params)) == 4
    assert adapter.user_tokens(tree, jnp.zeros((3, EMBED))).shape == (3, 2, 32)
    counts = adapter.count(tree)
    assert counts["projection"] == EMBED * 64 + 64 + 2 * 32
    assert counts["attention"] == 2 * 32 * (32 + 64 + 32 + 32)  # down, mid, up (2 layers)


def test_trained_adapter_depends_on_the_user(unet):
    _, params, _, users = unet
    tree = adapter.init(jax.random.key(1), params, EMBED)
    tree["attn"] = jax.tree_util.tree_map(
        lambda w: 0.1 * jax.random.normal(jax.random.key(2), w.shape), tree["attn"]
    )
    out = np.asarray(predict(unet, tree, users))
    swapped = np.asarray(predict(unet, tree, users[::-1]))
    assert np.abs(out[0] - swapped[0]).max() > 1e-3
    off = np.asarray(predict(unet, tree, users, scale=0.0))
    base = np.asarray(unet[0].apply({"params": params}, *unet[2]))
    np.testing.assert_allclose(off, base, atol=1e-5)


def test_gradients_reach_only_the_adapter(unet):
    _, params, _, users = unet
    tree = adapter.init(jax.random.key(1), params, EMBED, num_tokens=2)

    def loss(tree):
        return jnp.mean(predict(unet, tree, users) ** 2)

    grads = jax.grad(loss)(tree)
    flat = jax.tree_util.tree_leaves_with_path(grads["attn"])
    # With zero W' only to_v_ip receives gradient at init; to_k_ip's gradient is exactly zero
    # because the user branch's values are zero (docs/METHODS.md section 3: with N == 1 it stays zero forever).
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        if "to_v_ip" in name:
            assert float(jnp.abs(g).max()) > 0, name
        else:
            assert float(jnp.abs(g).max()) == 0, name


def test_bad_sizes_are_user_errors(unet):
    with pytest.raises(UserError, match="embed_dim=0"):
        adapter.init(jax.random.key(0), unet[1], embed_dim=0)
