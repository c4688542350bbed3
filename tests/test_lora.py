"""LoRA trees: targets, init, scale, fold == apply on the tiny UNet, parity with peft, errors."""

import re

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from torch_reference import nchw, nhwc, relative_error

from safealign_jax import UserError, lora
from safealign_jax.models.layers import Dense
from safealign_jax.trainable import Trainable

ATTENTION_PROJECTIONS = {"to_q", "to_k", "to_v", "to_out_0"}
# The tiny SD1 UNet (conftest.TINY_SD1) has 4 transformer blocks of 2 attentions each.
TINY_ATTENTIONS = 4 * 2


@pytest.fixture(scope="module")
def apply():
    """The tiny UNet's apply, jitted once (one compile per variables structure)."""
    return jax.jit(lambda module, variables, *args: module.apply(variables, *args), static_argnums=0)


def _inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 16, 4), np.float32)
    context = rng.standard_normal((batch, 7, 32), np.float32)
    return x, np.array([3, 911][:batch], np.int32), context


def _random_b(tree, seed=1, std=0.3):
    """`tree` with every b replaced by N(0, std) so the adapter actually changes the model."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {p: rng.normal(0, std, v.shape).astype(np.float32) if p[-1] == "b" else v for p, v in flat.items()}
    )


def test_default_targets_are_every_attention_projection(tiny_unet):
    _, params = tiny_unet
    paths = lora.targets(params)
    assert len(paths) == 4 * TINY_ATTENTIONS
    attentions = {p.rsplit("/", 1)[0] for p in paths}
    assert len(attentions) == TINY_ATTENTIONS
    assert {a.rsplit("/", 1)[1] for a in attentions} == {"attn1", "attn2"}
    for attention in attentions:
        assert {p.rsplit("/", 1)[1] for p in paths if p.startswith(attention + "/")} == ATTENTION_PROJECTIONS
    # Every Dense called to_* inside an attention is adapted; nothing else (ff, proj, time embedding).
    dense = [
        "/".join(p[:-1]) for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "kernel" and v.ndim == 2
    ]
    assert sorted(p for p in dense if re.search(r"attn[12]/to_", p)) == paths


def test_custom_targets_union_and_errors(tiny_unet):
    _, params = tiny_unet
    cross_kv = lora.targets(params, [r"attn2/to_k$", r"attn2/to_v$"])
    assert len(cross_kv) == 2 * 4  # to_k, to_v of the 4 cross-attentions
    assert lora.targets(params, r"attn2/to_(k|v)$") == cross_kv
    with pytest.raises(UserError, match=r"'attn3/to_q' matches none of the \d+ Dense layers"):
        lora.targets(params, [r"attn2/to_k$", "attn3/to_q"])
    with pytest.raises(UserError, match="not a valid regular expression"):
        lora.targets(params, "to_(q")
    with pytest.raises(UserError, match="matches none"):
        lora.init(jax.random.key(0), params, lora.LoRAConfig(targets=("conv_in",)))  # a conv, not Dense


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=-2), "rank=-2"),
        (dict(rank=2.0), "rank=2.0"),
        (dict(alpha=0), "alpha=0"),
        (dict(init="orthogonal"), "init='orthogonal'"),
        (dict(targets=()), "targets is empty"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        lora.LoRAConfig(**kwargs)


def test_scale():
    assert lora.LoRAConfig(rank=4).scale == 1.0
    assert lora.LoRAConfig(rank=4, alpha=8).scale == 2.0
    assert lora.LoRAConfig(rank=4, targets="to_q").targets == ("to_q",)


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform"])
def test_init_shapes_and_distribution(tiny_unet, init):
    _, params = tiny_unet
    rank = 8
    config = lora.LoRAConfig(rank=rank, init=init)
    tree = lora.init(jax.random.key(0), params, config)
    flat_params = traverse_util.flatten_dict(params)
    modules = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        modules.setdefault(path[:-1], {})[path[-1]] = np.asarray(leaf)
    assert sorted("/".join(m) for m in modules) == lora.targets(params)
    expected_count = 0
    for module, leaves in modules.items():
        fan_in, fan_out = flat_params[(*module, "kernel")].shape
        assert set(leaves) == {"a", "b"}
        assert leaves["a"].shape == (fan_in, rank) and leaves["b"].shape == (rank, fan_out)
        assert leaves["a"].dtype == leaves["b"].dtype == np.float32
        assert not leaves["b"].any()
        if init == "kaiming_uniform":
            assert np.abs(leaves["a"]).max() <= 1 / np.sqrt(fan_in)
            # U(-1/sqrt(in), 1/sqrt(in)) has std 1/sqrt(3 in)
            assert np.std(leaves["a"]) * np.sqrt(3 * fan_in) == pytest.approx(1, rel=0.15)
        expected_count += rank * (fan_in + fan_out)
    if init == "gaussian":
        a = np.concatenate([m["a"].ravel() for m in modules.values()])
        assert a.mean() == pytest.approx(0, abs=4 / rank / np.sqrt(a.size))  # 4 sigma
        assert a.std() == pytest.approx(1 / rank, rel=0.03)
    assert lora.count(tree) == expected_count
    again = lora.init(jax.random.key(0), params, config)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, tree, again)))


def test_variables_and_delta():
    rng = np.random.default_rng(0)
    tree = {"blk": {"to_q": {"a": rng.standard_normal((5, 2)), "b": rng.standard_normal((2, 3))}}}
    leaf = tree["blk"]["to_q"]
    variables = Trainable({"lora": tree}, {"lora": 2.5}).collections()["lora"]
    np.testing.assert_array_equal(variables["blk"]["to_q"]["a"], leaf["a"])
    np.testing.assert_allclose(variables["blk"]["to_q"]["b"], 2.5 * leaf["b"], rtol=1e-6)
    delta = lora.delta(tree, 2.5)
    assert set(delta["blk"]["to_q"]) == {"delta"}
    np.testing.assert_allclose(delta["blk"]["to_q"]["delta"], 2.5 * leaf["a"] @ leaf["b"], rtol=1e-5)
    assert lora.count(tree) == 5 * 2 + 2 * 3


def test_lora_apply_equals_fold(tiny_unet, apply):
    module, params = tiny_unet
    config = lora.LoRAConfig(rank=2, alpha=3)
    tree = _random_b(lora.init(jax.random.key(0), params, config))
    before = jax.tree_util.tree_map(np.array, params)
    inputs = _inputs()
    base = np.asarray(apply(module, {"params": params}, *inputs))
    adapted = np.asarray(apply(module, {"params": params, **Trainable({"lora": tree}, {"lora": config.scale}).collections()}, *inputs))
    folded = np.asarray(apply(module, {"params": lora.fold(params, tree, config.scale)}, *inputs))
    change, err = relative_error(adapted, base), relative_error(folded, adapted)
    print(f"LoRA changes the UNet output by {change:.2e} (relative); fold vs apply {err:.2e}")
    assert change > 1e-2
    assert err <= 1e-5
    # The base params are never mutated.
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, before, params)))


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Dense(3, name="ff")(Dense(4, name="to_q")(x))


def test_dense_reads_lora_and_delta():
    """Dense's two seams: {"a", "b"} and {"delta"} give the same output as the folded kernel."""
    model = _TwoLayers()
    x = np.random.default_rng(0).standard_normal((2, 5), np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    assert lora.targets(params) == ["to_q"]
    tree = _random_b(lora.init(jax.random.key(1), params, lora.LoRAConfig(rank=2)))
    base = model.apply({"params": params}, x)
    adapted = model.apply({"params": params, **Trainable({"lora": tree}, {"lora": 0.5}).collections()}, x)
    as_delta = model.apply({"params": params, "lora": lora.delta(tree, 0.5)}, x)
    folded = model.apply({"params": lora.fold(params, tree, 0.5)}, x)
    assert relative_error(adapted, base) > 1e-2
    np.testing.assert_allclose(as_delta, adapted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded, adapted, rtol=1e-5, atol=1e-6)


def test_fold_delta_errors(tiny_unet):
    _, params = tiny_unet
    path = lora.targets(params)[0]
    fan_in, fan_out = traverse_util.flatten_dict(params)[(*path.split("/"), "kernel")].shape
    wrong_path = traverse_util.unflatten_dict({("mid_block", "nope", "delta"): np.zeros((fan_in, fan_out))})
    with pytest.raises(UserError, match="'mid_block/nope' is not a Dense layer"):
        lora.fold_delta(params, wrong_path)
    wrong_shape = traverse_util.unflatten_dict({(*path.split("/"), "delta"): np.zeros((fan_in + 1, fan_out))})
    with pytest.raises(UserError, match=rf"delta of shape \({fan_in + 1}, {fan_out}\)"):
        lora.fold_delta(params, wrong_shape)
    not_a_delta = traverse_util.unflatten_dict({(*path.split("/"), "a"): np.zeros((fan_in, 2))})
    with pytest.raises(UserError, match="leaves named 'delta'"):
        lora.fold_delta(params, not_a_delta)


def test_parity_with_peft(tiny_unet, tiny_unet_dir, apply):
    """Our y = xW + (alpha/r)(x a) b equals peft's LoRA on diffusers' UNet with the same a, b."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from safealign_jax.models.load import DIFFUSERS_NAMES

    module, params = tiny_unet
    config = lora.LoRAConfig(rank=2, alpha=3)
    tree = _random_b(lora.init(jax.random.key(0), params, config))
    torch_model = UNet2DConditionModel.from_pretrained(tiny_unet_dir).eval()
    peft_config = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch_model = inject_adapter_in_model(peft_config, torch_model)
    peft_modules = {n for n, m in torch_model.named_modules() if hasattr(m, "lora_A")}
    assert len(peft_modules) == len(lora.targets(params))
    assert lora.count(tree) == sum(p.numel() for n, p in torch_model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            name = DIFFUSERS_NAMES.torch_name((*path[:-1], "kernel")).removesuffix(".weight")
            assert name in peft_modules
            weight = torch_model.get_submodule(f"{name}.lora_{path[-1].upper()}.default").weight
            weight.copy_(torch.from_numpy(np.asarray(leaf).T.copy()))
        x, t, context = _inputs()
        reference = nhwc(torch_model(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    ours = apply(module, {"params": params, **Trainable({"lora": tree}, {"lora": config.scale}).collections()}, x, t, context)
    err = relative_error(ours, reference)
    print(f"LoRA vs peft: relative max abs error {err:.2e}")
    assert err <= 1e-4


def test_from_delta_starts_at_the_rank_r_fit(tiny_unet):
    """A LoRA initialised from a delta: s a b is the best rank-r fit of the delta (exact for a
    delta of rank <= r), zero-singular-value components keep a random a (so they still train),
    the other targets start as `init` (b = 0), and a delta on a non-target layer is refused."""
    _, params = tiny_unet
    config = lora.LoRAConfig(rank=2, alpha=3)
    paths = lora.targets(params)
    kernels = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(0)
    low, full = paths[0], paths[1]
    fan_in, fan_out = kernels[(*low.split("/"), "kernel")].shape
    rank_one = np.outer(rng.standard_normal(fan_in), rng.standard_normal(fan_out))
    fan_in2, fan_out2 = kernels[(*full.split("/"), "kernel")].shape
    dense = rng.standard_normal((fan_in2, fan_out2))
    deltas = traverse_util.unflatten_dict({(*low.split("/"), "delta"): rank_one, (*full.split("/"), "delta"): dense})
    tree = lora.from_delta(jax.random.key(0), params, config, deltas)
    product = traverse_util.flatten_dict(lora.delta(tree, config.scale))
    np.testing.assert_allclose(product[(*low.split("/"), "delta")], rank_one, atol=1e-5)
    u, s, vt = np.linalg.svd(dense)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(product[(*full.split("/"), "delta")], best, atol=1e-4)
    flat = traverse_util.flatten_dict(tree)
    fresh = traverse_util.flatten_dict(lora.init(jax.random.key(0), params, config))
    # rank-one delta: the second component is init's random a with a zero b.
    np.testing.assert_array_equal(flat[(*low.split("/"), "a")][:, 1], fresh[(*low.split("/"), "a")][:, 1])
    assert np.abs(flat[(*low.split("/"), "a")][:, 1]).max() > 0
    np.testing.assert_array_equal(flat[(*low.split("/"), "b")][1], 0)
    for other in paths[2:]:
        np.testing.assert_array_equal(flat[(*other.split("/"), "a")], fresh[(*other.split("/"), "a")])
        np.testing.assert_array_equal(flat[(*other.split("/"), "b")], 0)
    narrow = lora.LoRAConfig(rank=2, targets=[r"attn1/to_q$"])
    with pytest.raises(UserError, match="is not a LoRA target"):
        lora.from_delta(jax.random.key(0), params, narrow,
                        traverse_util.unflatten_dict({(*paths[1].split("/"), "delta"): dense}))
