"""The PSA user adapter as its own pytree (the base UNet stays frozen).

    tree = {
      "proj": {"kernel": (E, N * D), "bias": (N * D,)},   # user projection Linear(E -> N*D)
      "norm": {"scale": (D,), "bias": (D,)},               # LayerNorm(D) over each user token
      "attn": {<UNet path of every attn2>: {"to_k_ip": (D, inner), "to_v_ip": (D, inner)}},
    }

E = user-embedding width (3584 for Qwen2.5-7B), N = user tokens, D = UNet cross-attention width,
inner = that attention's width. `to_k_ip` / `to_v_ip` start at ZERO, so a fresh adapter leaves
the UNet unchanged. In every attn2 the model then computes
    out = to_out(Attn(q, K_text, V_text) + lambda * Attn(q, u to_k_ip, u to_v_ip)),
with lambda folded into `to_v_ip` by `variables` (attention is linear in V). Structurally this is
diffusers' IP-Adapter (ImageProjection + per-layer to_k_ip / to_v_ip), which is how it is exported.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safealign_jax.errors import check

LAYER_NORM_EPS = 1e-5


def cross_attention_paths(unet_params: dict) -> list[tuple[str, ...]]:
    """Paths (in module order of the params tree) of every cross-attention (`attn2`)."""
    flat = traverse_util.flatten_dict(unet_params)
    return list(dict.fromkeys(p[: p.index("attn2") + 1] for p in flat if "attn2" in p))


def init(
    key: jax.Array, unet_params: dict, embed_dim: int = 3584, num_tokens: int = 1
) -> dict:
    """A fresh adapter for the UNet whose params are `unet_params` (float32).

    The projection is initialised like torch.nn.Linear (uniform +-1/sqrt(E)); the LayerNorm as
    identity; every to_k_ip / to_v_ip as zeros.
    """
    check(embed_dim >= 1 and num_tokens >= 1, f"adapter embed_dim={embed_dim} and num_tokens={num_tokens} must be >= 1.")
    paths = cross_attention_paths(unet_params)
    check(bool(paths), "the UNet has no cross-attention (attn2) for the user adapter.")
    flat = traverse_util.flatten_dict(unet_params)
    cross_dim = flat[paths[0] + ("to_k", "kernel")].shape[0]
    bound = 1.0 / np.sqrt(embed_dim)
    k_w, k_b = jax.random.split(key)
    attn = {}
    for path in paths:
        d, inner = flat[path + ("to_k", "kernel")].shape
        attn[path + ("to_k_ip",)] = jnp.zeros((d, inner), jnp.float32)
        attn[path + ("to_v_ip",)] = jnp.zeros((d, inner), jnp.float32)
    return {
        "proj": {
            "kernel": jax.random.uniform(k_w, (embed_dim, num_tokens * cross_dim), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (num_tokens * cross_dim,), jnp.float32, -bound, bound),
        },
        "norm": {"scale": jnp.ones((cross_dim,), jnp.float32), "bias": jnp.zeros((cross_dim,), jnp.float32)},
        "attn": traverse_util.unflatten_dict(attn),
    }


def user_tokens(tree: dict, embedding: jax.Array) -> jax.Array:
    """(B, E) user embeddings -> (B, N, D) user tokens: LayerNorm(reshape(Linear(e)))."""
    proj, norm = tree["proj"], tree["norm"]
    d = norm["scale"].shape[0]
    x = jnp.dot(embedding.astype(jnp.float32), proj["kernel"]) + proj["bias"]
    x = x.reshape(x.shape[0], -1, d)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * norm["scale"] + norm["bias"]


def variables(tree: dict, scale: float = 1.0) -> dict:
    """The "adapter" collection for `UNet.apply`, with lambda = `scale` folded into to_v_ip."""
    flat = traverse_util.flatten_dict(tree["attn"])
    return traverse_util.unflatten_dict(
        {p: v * scale if p[-1] == "to_v_ip" else v for p, v in flat.items()}
    )


def count(tree: dict) -> dict[str, int]:
    """Parameter counts: {"projection": ..., "attention": ..., "total": ...}."""
    size = lambda t: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(t)))  # noqa: E731
    projection = size(tree["proj"]) + size(tree["norm"])
    attention = size(tree["attn"])
    return {"projection": projection, "attention": attention, "total": projection + attention}
