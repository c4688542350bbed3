"""Attention and transformer blocks, named as diffusers' Attention / BasicTransformerBlock /
Transformer2DModel so parameter paths match the checkpoints.

Tokens are (batch, length, width). Attention runs through `jax.nn.dot_product_attention`; its
implementation is XLA's unless chosen at trace time with `attention_implementation("cudnn")`
(the fused cuDNN kernel on GPUs, applied to bf16/fp16 attention only; fp32 stays on XLA).

The PSA seam: an `Attention` used as cross-attention reads, when present, its own entries
`to_k_ip` (D, inner) and `to_v_ip` (D, inner) of the "adapter" collection and adds an attention
over the user tokens: out = to_out(Attn(q, K, V) + Attn(q, u to_k_ip, u to_v_ip)). The user-branch
scale lambda is folded into `to_v_ip` by `safealign_jax.adapter` (attention is linear in V).
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.models.layers import Dense, Dtype, conv, group_norm, layer_norm

ADAPTER = "adapter"
_IMPLEMENTATION = contextvars.ContextVar("attention_implementation", default=None)


@contextlib.contextmanager
def attention_implementation(name: str | None):
    """Models traced inside the block call `jax.nn.dot_product_attention` with
    implementation=`name` ("xla" or "cudnn"; None or "" lets JAX choose). Wrap the jit lowering."""
    token = _IMPLEMENTATION.set(name or None)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, upcast: bool) -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      q: (B, Tq, heads * d); k, v: (B, Tk, heads * d).
      upcast: compute in float32 whatever the input dtype (diffusers' upcast_attention).
    Returns:
      (B, Tq, heads * d) in q's dtype.
    """
    b, tq, inner = q.shape
    dtype = q.dtype
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, inner // heads)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    implementation = _IMPLEMENTATION.get()
    if implementation == "cudnn" and q.dtype == jnp.float32:
        implementation = None  # cuDNN's fused attention takes bf16 / fp16 only
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, tq, inner).astype(dtype)


class Attention(nn.Module):
    """diffusers `Attention`: to_q/to_k/to_v (no bias) and to_out.0 (bias).

    Attributes:
      heads: number of heads; dim_head: width of one head; out_dim: output width.
      upcast: run the attention itself in float32.
    """

    heads: int
    dim_head: int
    out_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, user_tokens: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, T, C); context: (B, S, D) or None for self-attention; user_tokens: (B, N, D)."""
        inner = self.heads * self.dim_head
        dense = lambda name, bias=False: Dense(  # noqa: E731
            inner if name != "to_out_0" else self.out_dim,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        context = x if context is None else context
        q = dense("to_q")(x)
        out = attend(q, dense("to_k")(context), dense("to_v")(context), self.heads, self.upcast)
        if user_tokens is not None and self.has_variable(ADAPTER, "to_k_ip"):
            u = user_tokens.astype(self.dtype)
            k_ip = jnp.dot(u, self.get_variable(ADAPTER, "to_k_ip").astype(self.dtype))
            v_ip = jnp.dot(u, self.get_variable(ADAPTER, "to_v_ip").astype(self.dtype))
            out = out + attend(q, k_ip, v_ip, self.heads, self.upcast)
        return dense("to_out_0", bias=True)(out)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: net.0.proj (dim -> 8 dim), exact GELU gate, net.2."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        geglu = GEGLU(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")
        return Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(geglu(x))


class GEGLU(nn.Module):
    """x -> h * gelu(gate) with (h, gate) = split(proj(x))."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.inner * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm and residual."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, user_tokens=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, self.upcast, name=name, **kw)  # noqa: E731
        x = attn("attn1")(layer_norm(1e-5, name="norm1", **kw)(x)) + x
        x = attn("attn2")(layer_norm(1e-5, name="norm2", **kw)(x), context, user_tokens) + x
        return FeedForward(self.dim, name="ff", **kw)(layer_norm(1e-5, name="norm3", **kw)(x)) + x


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on NHWC features: GroupNorm, proj_in, blocks, proj_out.

    Attributes:
      heads, dim_head: attention shape (heads * dim_head = channels).
      num_layers: transformer blocks; use_linear_projection: proj_in/out Linear (SD2, SDXL)
      instead of 1x1 Conv (SD1); norm_groups: GroupNorm groups (eps 1e-6 as in diffusers).
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, user_tokens=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.norm_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = Dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.upcast, name=f"transformer_blocks_{i}", **kw
            )(x, context, user_tokens)
        if self.use_linear_projection:
            x = Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual
