"""Attention and transformer blocks, named as diffusers' Attention / BasicTransformerBlock /
Transformer2DModel so parameter paths match the checkpoints.

Tokens are (batch, length, width). The attention implementation is a module attribute (hence
part of every jitted function that closes over the module, never a context variable):

  "auto"     the fused kernel of the platform when it takes the shapes and dtype (cuDNN flash
             attention on GPU in bf16/fp16; the Pallas flash kernel on TPU), else "chunked"
  "xla"      `jax.nn.dot_product_attention`'s XLA path: writes the (B, heads, Tq, Tk) scores
  "chunked"  blocks of `QUERY_CHUNK` queries in plain JAX (`lax.map` forward, a custom VJP
             that recomputes each block's scores backward): memory O(T x chunk), never (T, T)
  "cudnn"    cuDNN's fused kernel (GPU, bf16/fp16 only)
  "pallas"   the Pallas TPU flash kernel (TPU; CPU only under pltpu.force_tpu_interpret_mode)

Every implementation multiplies q k^T with fp32 accumulation and runs the softmax in fp32 on
bf16/fp16 inputs, which is what diffusers' `upcast_attention` (SD2.1) asks for: upcasting is
honoured by all of them, never a reason to fall back to another path.

The PSA seam: an `Attention` used as cross-attention reads, when present, its own entries
`to_k_ip` (D, inner) and `to_v_ip` (D, inner) of the "adapter" collection and adds an attention
over the user tokens: out = to_out(Attn(q, K, V) + Attn(q, u to_k_ip, u to_v_ip)). The user-branch
scale lambda is folded into `to_v_ip` by `safealign_jax.adapter` (attention is linear in V).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.errors import UserError
from safealign_jax.models.layers import DtypeModule
from safealign_jax.models.remat import remat

ADAPTER = "adapter"
IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "pallas")
QUERY_CHUNK = 128  # queries per block of the chunked path
PALLAS_BLOCK = 128  # the Pallas TPU kernel's default block: Tq and Tk must be multiples of it
_HALF = (jnp.bfloat16, jnp.float16)


def _query_blocks(x: jax.Array, chunk: int) -> jax.Array:
    """(B, T, H, d) -> (ceil(T / chunk), B, chunk, H, d), zero-padding the last block."""
    b, t, h, d = x.shape
    n = -(-t // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
    return x.reshape(b, n, chunk, h, d).swapaxes(0, 1)


def _unblock(x: jax.Array, t: int) -> jax.Array:
    """Inverse of `_query_blocks`: (n, B, chunk, H, d) -> (B, t, H, d)."""
    n, b, chunk, h, d = x.shape
    return x.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


def _probabilities(q_block: jax.Array, k: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) of one block: (B, c, H, d), (B, Tk, H, d) -> (B, H, c, Tk) fp32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_block, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * q_block.shape[-1] ** -0.5, axis=-1)


def _attend_block(q_block: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    probs = _probabilities(q_block, k).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = QUERY_CHUNK) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v one block of `chunk` queries at a time.

    Args:
      q: (B, Tq, H, d); k, v: (B, Tk, H, d), one dtype.
    Returns:
      (B, Tq, H, d). The largest intermediate is one block's scores (B, H, chunk, Tk) in fp32, in
      the forward and in the backward pass alike: the custom VJP keeps only q, k, v and the output
      and recomputes each block's probabilities, so no remat policy can save the scores.
    """
    if q.shape[1] <= chunk:
        return _attend_block(q, k, v)
    return _unblock(jax.lax.map(lambda qb: _attend_block(qb, k, v), _query_blocks(q, chunk)), q.shape[1])


def _chunked_forward(q, k, v, chunk):
    out = chunked_attention(q, k, v, chunk)
    return out, (q, k, v, out)


def _chunked_backward(chunk, residuals, d_out):
    """Per query block: dP = dO V^T, dS = P (dP - rowsum(dO O)) / sqrt(d); dQ = dS K,
    dK += dS^T Q, dV += P^T dO, accumulated in fp32. Padded rows have dO = 0 and add nothing."""
    q, k, v, out = residuals
    scale = q.shape[-1] ** -0.5
    chunk = min(chunk, q.shape[1])

    def block(carry, xs):
        dk, dv = carry
        q_block, d_out_block, out_block = xs
        probs = _probabilities(q_block, k)
        dv = dv + jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out_block,
                             preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out_block, v, preferred_element_type=jnp.float32)
        rowsum = jnp.einsum("bqhd,bqhd->bhq", d_out_block, out_block, preferred_element_type=jnp.float32)
        d_logits = (probs * (d_probs - rowsum[..., None]) * scale).astype(q.dtype)
        dq = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhqk,bqhd->bkhd", d_logits, q_block, preferred_element_type=jnp.float32)
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    xs = tuple(_query_blocks(x, chunk) for x in (q, d_out.astype(q.dtype), out))
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), xs)
    return _unblock(dq, q.shape[1]), dk.astype(k.dtype), dv.astype(v.dtype)


chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas TPU flash kernel on (B, T, H, d) inputs (Tq, Tk multiples of PALLAS_BLOCK)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731
    out = flash_attention(heads_first(q), heads_first(k), heads_first(v), sm_scale=q.shape[-1] ** -0.5)
    return out.swapaxes(1, 2)


def resolve(implementation: str, q: jax.Array, k: jax.Array, platform: str | None = None) -> str:
    """The implementation "auto" stands for with these (B, T, H, d) inputs on `platform` (default:
    JAX's default backend): "cudnn", "pallas" or "chunked"; an explicit choice is returned as is."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"attention={implementation!r} is unknown (expected one of {IMPLEMENTATIONS}).")
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    d = q.shape[-1]
    if platform == "gpu" and q.dtype in _HALF and d % 8 == 0 and d <= 128:
        return "cudnn"
    if platform == "tpu" and q.shape[1] % PALLAS_BLOCK == 0 and k.shape[1] % PALLAS_BLOCK == 0:
        return "pallas"
    return "chunked"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, upcast: bool = False,
           implementation: str = "auto") -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      q: (B, Tq, heads * d); k, v: (B, Tk, heads * d).
      upcast: diffusers' upcast_attention; every implementation already accumulates the scores
        and runs the softmax in fp32 (module docstring), so it selects no other path.
      implementation: one of IMPLEMENTATIONS (module docstring).
    Returns:
      (B, Tq, heads * d) in q's dtype.
    """
    del upcast  # honoured by every implementation (fp32 accumulation and softmax)
    b, tq, inner = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, inner // heads)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    implementation = resolve(implementation, q, k)
    if implementation == "chunked":
        out = chunked_attention(q, k, v)
    elif implementation == "pallas":
        out = pallas_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, tq, inner)


class Attention(DtypeModule):
    """diffusers `Attention`: to_q/to_k/to_v (no bias) and to_out.0 (bias).

    Attributes:
      heads: number of heads; dim_head: width of one head; out_dim: output width.
      upcast: diffusers' upcast_attention (see `attend`); attention: one of IMPLEMENTATIONS.
    """

    heads: int
    dim_head: int
    out_dim: int
    upcast: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, user_tokens: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, T, C); context: (B, S, D) or None for self-attention; user_tokens: (B, N, D)."""
        inner = self.heads * self.dim_head
        context = x if context is None else context
        q = self.dense(inner, "to_q", use_bias=False)(x)
        k, v = (self.dense(inner, name, use_bias=False)(context) for name in ("to_k", "to_v"))
        out = attend(q, k, v, self.heads, self.upcast, self.attention)
        if user_tokens is not None and self.has_variable(ADAPTER, "to_k_ip"):
            u = user_tokens.astype(self.dtype)
            k_ip = jnp.dot(u, self.get_variable(ADAPTER, "to_k_ip").astype(self.dtype))
            v_ip = jnp.dot(u, self.get_variable(ADAPTER, "to_v_ip").astype(self.dtype))
            out = out + attend(q, k_ip, v_ip, self.heads, self.upcast, self.attention)
        return self.dense(self.out_dim, "to_out_0")(out)


class FeedForward(DtypeModule):
    """diffusers `FeedForward` with GEGLU: net.0.proj (dim -> 8 dim), exact GELU gate, net.2."""

    dim: int
    mult: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        geglu = GEGLU(self.dim * self.mult, name="net_0", **self.dtypes)
        return self.dense(self.dim, "net_2")(geglu(x))


class GEGLU(DtypeModule):
    """x -> h * gelu(gate) with (h, gate) = split(proj(x))."""

    inner: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.dense(self.inner * 2, "proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(DtypeModule):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm and residual."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context, user_tokens=None):
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, self.upcast,  # noqa: E731
                                      self.attention, name=name, **self.dtypes)
        x = attn("attn1")(self.layer_norm(1e-5, "norm1")(x)) + x
        x = attn("attn2")(self.layer_norm(1e-5, "norm2")(x), context, user_tokens) + x
        return FeedForward(self.dim, name="ff", **self.dtypes)(self.layer_norm(1e-5, "norm3")(x)) + x


class Transformer2DModel(DtypeModule):
    """diffusers `Transformer2DModel` on NHWC features: GroupNorm, proj_in, blocks, proj_out.

    Attributes:
      heads, dim_head: attention shape (heads * dim_head = channels).
      num_layers: transformer blocks; use_linear_projection: proj_in/out Linear (SD2, SDXL)
      instead of 1x1 Conv (SD1); norm_groups: GroupNorm groups (eps 1e-6 as in diffusers).
      attention: one of IMPLEMENTATIONS.
      layer_remat: checkpoint policy of each BasicTransformerBlock (a key of remat.REMAT_POLICIES).
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast: bool = False
    norm_groups: int = 32
    attention: str = "auto"
    layer_remat: str = "none"

    @nn.compact
    def __call__(self, x, context, user_tokens=None):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = self.group_norm(self.norm_groups, 1e-6, "norm")(x)
        if self.use_linear_projection:
            x = self.dense(inner, "proj_in")(x.reshape(b, h * w, c))
        else:
            x = self.conv(inner, 1, "proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = remat(BasicTransformerBlock, self.layer_remat)(
                inner, self.heads, self.dim_head, self.upcast, self.attention,
                name=f"transformer_blocks_{i}", **self.dtypes
            )(x, context, user_tokens)
        if self.use_linear_projection:
            x = self.dense(c, "proj_out")(x).reshape(b, h, w, c)
        else:
            x = self.conv(c, 1, "proj_out")(x.reshape(b, h, w, inner))
        return x + residual
