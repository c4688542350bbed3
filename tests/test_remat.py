"""Remat policies of the UNet (models/remat.py): per block or per layer, the same params tree and
the same gradients as no remat, one checkpoint per block / layer, and less kept for the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from train_helper import tiny_config

from safealign_jax import UserError
from safealign_jax.models import UNet2DConditionModel, UNetConfig
from safealign_jax.models.remat import UNET_REMAT_POLICIES, split
from safealign_jax.train.config import validate

# SDXL-shaped and tiny: a down block without attention, cross-attention blocks holding 2
# transformer layers each (so per-layer remat wraps several BasicTransformerBlocks per block).
STRUCTURE = UNetConfig(
    block_out_channels=(16, 32),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=4,
    sample_size=8,
)


def test_split_names_the_granularity():
    assert split("none") == ("none", "none")
    assert split("full") == ("full", "none")
    assert split("dots_no_batch") == ("dots_no_batch", "none")
    assert split("full_per_layer") == ("none", "full")
    assert split("dots_no_batch_per_layer") == ("none", "dots_no_batch")
    assert set(UNET_REMAT_POLICIES) == {"none", "full", "dots", "dots_no_batch", "full_per_layer",
                                        "dots_per_layer", "dots_no_batch_per_layer"}


def _inputs(batch=2, size=8, seq=5):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, size, size, 4)), jnp.float32),
            jnp.asarray(np.linspace(3, 700, batch), jnp.int32),
            jnp.asarray(rng.standard_normal((batch, seq, 16)), jnp.float32))


def test_params_tree_is_the_same_for_every_policy():
    trees = {}
    for policy in UNET_REMAT_POLICIES:
        module = UNet2DConditionModel(STRUCTURE, remat_policy=policy)
        shapes = jax.eval_shape(module.init, jax.random.key(0), *_inputs())["params"]
        trees[policy] = {"/".join(str(k.key) for k in path): (leaf.shape, leaf.dtype)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    reference = trees["none"]
    # the diffusers-named paths the checkpoint / torch-name seam relies on
    assert "up_blocks_0/attentions_0/transformer_blocks_1/attn1/to_q/kernel" in reference
    assert "down_blocks_1/resnets_0/conv1/kernel" in reference
    for policy, tree in trees.items():
        assert tree == reference, policy


@pytest.mark.parametrize("policy", ["full_per_layer", pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("dots_per_layer", marks=pytest.mark.slow)])
def test_gradients_with_remat_equal_those_without(policy):
    sample, t, context = _inputs()
    params = UNet2DConditionModel(STRUCTURE).init(jax.random.key(1), sample, t, context)["params"]
    target = jnp.asarray(np.random.default_rng(2).standard_normal(sample.shape), jnp.float32)

    def grads(policy):
        module = UNet2DConditionModel(STRUCTURE, remat_policy=policy)

        def loss(p, context):
            return jnp.mean((module.apply({"params": p}, sample, t, context) - target) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, context)

    reference, got = grads("none"), grads(policy)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(reference)) > 0
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _checkpoints(jaxpr) -> int:
    """Checkpoint (remat) equations in `jaxpr` and its sub-jaxprs."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for sub in jaxprs_in_params(eqn.params):
            count += _checkpoints(sub)
    return count


def test_the_jaxpr_rematerialises_each_layer():
    """Per layer: one checkpoint per ResnetBlock2D and per BasicTransformerBlock; per block: one per
    UNet block."""
    sample, t, context = _inputs(batch=1)
    params = UNet2DConditionModel(STRUCTURE).init(jax.random.key(1), sample, t, context)["params"]

    def checkpoints(policy):
        module = UNet2DConditionModel(STRUCTURE, remat_policy=policy)
        return _checkpoints(jax.make_jaxpr(module.apply)({"params": params}, sample, t, context).jaxpr)

    # resnets: down 1 + 1, mid 2, up 2 + 2 = 8; transformer layers: down 2, mid 2, up 2 x 2 = 8
    assert checkpoints("full_per_layer") == 16
    assert checkpoints("full") == 5  # down_blocks_0, down_blocks_1, mid_block, up_blocks_0, up_blocks_1
    assert checkpoints("none") == 0


def test_an_unknown_policy_is_one_user_error():
    module = UNet2DConditionModel(STRUCTURE, remat_policy="layer")
    with pytest.raises(UserError, match=r"remat_policy='layer' is unknown .*full_per_layer"):
        module.init(jax.random.key(0), *_inputs())
    config = tiny_config({"model.remat_policy": "layer"})
    with pytest.raises(UserError, match=r"--config.model.remat_policy='layer' is invalid"):
        validate(config)
    validate(tiny_config({"model.remat_policy": "full_per_layer"}))  # accepted


def _saved_bytes(policy: str, batch: int, size: int) -> int:
    """Bytes the UNet keeps from its forward for its backward: the leaves of jax.vjp's closure
    (the residuals, weights included), by shapes only."""
    module = UNet2DConditionModel(STRUCTURE, remat_policy=policy)
    sample, t, context = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _inputs(batch, size))
    params = jax.eval_shape(module.init, jax.random.key(0), sample, t, context)["params"]

    def residuals(p, x, t, c):
        return jax.tree_util.tree_leaves(jax.vjp(lambda x: module.apply({"params": p}, x, t, c), x)[1])

    leaves = jax.eval_shape(residuals, params, sample, t, context)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


def test_remat_keeps_less_for_the_backward_and_per_layer_keeps_each_layers_input():
    """What remat changes in every backend's program: the forward values kept for the backward.
    (XLA:CPU's memory analysis of a compiled step hardly moves with remat, BENCHMARKS.md.)"""
    saved = {policy: _saved_bytes(policy, batch=8, size=32) for policy in ("none", "full", "full_per_layer")}
    assert saved["none"] > 4 * saved["full_per_layer"], saved
    assert saved["full_per_layer"] > saved["full"], saved  # one input per layer, not per block
    # the difference is made of activations (the inputs of the layers after each block's first):
    # at a quarter of the batch it is about a quarter
    small = {policy: _saved_bytes(policy, batch=2, size=32) for policy in ("full", "full_per_layer")}
    ratio = (saved["full_per_layer"] - saved["full"]) / (small["full_per_layer"] - small["full"])
    assert 3.9 < ratio < 4.1, ratio
