"""The attention implementations (safealign_jax.models.attention) against a float64 numpy
reference, the "auto" choice per platform, and the memory claim of the chunked path read off its
jaxpr: no intermediate of the forward or backward pass has two axes of length T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safealign_jax.errors import UserError
from safealign_jax.models import UNet2DConditionModel, UNetConfig
from safealign_jax.models.attention import attend, resolve
from safealign_jax.models.unet_blocks import REMAT_POLICIES


def reference(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, float64 numpy; q (B, Tq, H d), k, v (B, Tk, H d)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, inner = q.shape
    d = inner // heads
    split = lambda x: x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, tq, inner)


def inputs(tq, tk, heads=2, d=8, batch=2, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(tq * 1000 + tk), 3)
    return [jax.random.normal(key, (batch, t, heads * d), dtype) for key, t in zip(keys, (tq, tk, tk), strict=True)]


# Tq = 300 is not a multiple of the 128-query block (padded last block); 77 keys as CLIP's text.
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("tq,tk", [(300, 300), (300, 77), (64, 77)])
def test_matches_reference_fp32(implementation, tq, tk):
    q, k, v = inputs(tq, tk)
    out = attend(q, k, v, heads=2, implementation=implementation)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(q, k, v, 2), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tq,tk", [(300, 300), (300, 77), (64, 77)])
def test_chunked_gradients_match_xla(tq, tk):
    q, k, v = inputs(tq, tk)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def grads(implementation):
        loss = lambda q, k, v: jnp.sum(w * attend(q, k, v, 2, implementation=implementation))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for ours, theirs in zip(grads("chunked"), grads("xla"), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("upcast", [False, True])
def test_bf16_inputs_accumulate_in_fp32(upcast):
    """bf16 q, k, v: the chunked and XLA paths agree with the fp64 reference of the same bf16
    values to bf16 output rounding (fp32 logits and softmax); the output stays bf16."""
    q, k, v = inputs(256, 256, dtype=jnp.bfloat16)
    expected = reference(q, k, v, 2)
    for implementation in ("chunked", "xla"):
        out = attend(q, k, v, 2, upcast=upcast, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=2e-2)


def test_pallas_kernel_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = inputs(128, 128, heads=1, d=16, batch=1)
    with pltpu.force_tpu_interpret_mode():
        out = attend(q, k, v, heads=1, implementation="pallas")
    np.testing.assert_allclose(out, reference(q, k, v, 1), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_reference_bf16():
    q, k, v = inputs(1024, 77, heads=8, d=40, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: attend(q, k, v, 8, implementation="cudnn"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, 8), atol=2e-2, rtol=2e-2)


def test_auto_resolves_per_platform_and_dtype():
    bf16 = jnp.zeros((1, 256, 8, 40), jnp.bfloat16)
    fp32 = bf16.astype(jnp.float32)
    text = jnp.zeros((1, 77, 8, 40), jnp.bfloat16)
    assert resolve("auto", bf16, bf16, "gpu") == "cudnn"
    assert resolve("auto", fp32, fp32, "gpu") == "chunked"  # cuDNN's fused kernel takes bf16/fp16
    assert resolve("auto", jnp.zeros((1, 256, 2, 160), jnp.bfloat16), bf16, "gpu") == "chunked"
    assert resolve("auto", bf16, bf16, "tpu") == "pallas"
    assert resolve("auto", bf16, text, "tpu") == "chunked"  # 77 keys: not a multiple of 128
    assert resolve("auto", bf16, bf16, "cpu") == "chunked"
    assert resolve("xla", bf16, bf16, "gpu") == "xla"
    with pytest.raises(UserError, match="flash"):
        resolve("flash", bf16, bf16)


def _intermediate_shapes(jaxpr):
    """Shapes of every variable bound inside `jaxpr` and its sub-jaxprs (scan, remat, pjit...)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _intermediate_shapes(inner)


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive `name` in `jaxpr` and its sub-jaxprs."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
    return count


def _scores_like(implementation, policy=None, t=1024, heads=2, batch=2):
    """Shapes in the forward + backward jaxpr with two axes of length t or b h t t elements;
    `policy`: the attention inside a block rematerialised with that checkpoint policy."""
    q, k, v = inputs(t, t, heads=heads, batch=batch)
    attention = lambda q, k, v: attend(q, k, v, heads, implementation=implementation)  # noqa: E731
    if policy is not None:
        attention = jax.checkpoint(attention, policy=REMAT_POLICIES[policy])
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    return [s for s in _intermediate_shapes(jaxpr)
            if list(s).count(t) >= 2 or np.prod(s, dtype=np.int64) >= batch * heads * t * t]


@pytest.mark.parametrize("policy", [None, "full", "dots"])
def test_chunked_path_never_builds_a_t_by_t_array(policy):
    assert _scores_like("xla", policy), "the check must see XLA's (B, H, T, T) scores"
    assert _scores_like("chunked", policy) == []


def test_unet_attention_setting_changes_the_program_not_the_result():
    config = UNetConfig(block_out_channels=(32,), layers_per_block=(1,), transformer_layers_per_block=(1,),
                        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        cross_attention_dim=32, attention_head_dim=(4,), norm_num_groups=8)
    chunked = UNet2DConditionModel(config, attention="chunked")
    xla = chunked.clone(attention="xla")
    sample, t, context, _ = chunked.dummy_inputs(batch=1, size=16, seq_len=8)
    sample = jax.random.normal(jax.random.key(1), sample.shape)
    context = jax.random.normal(jax.random.key(2), context.shape)
    params = chunked.init(jax.random.key(0), sample, t, context)
    outs = [jax.jit(m.apply)(params, sample, t, context) for m in (chunked, xla)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    scans = [_count_primitive(jax.make_jaxpr(m.apply)(params, sample, t, context).jaxpr, "scan")
             for m in (chunked, xla)]
    # 4 transformer blocks (down 1, mid 1, up 2) at 16 x 16 = 256 tokens, self- and cross-attention
    assert scans == [8, 0]
