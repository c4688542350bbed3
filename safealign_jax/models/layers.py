"""Basic layers shared by the ports, with the seams used by LoRA and merged deltas.

Trainable additions never live in the frozen "params" collection. An adapted `Dense`
reads, when present, its own entries of the "lora" collection, whose tree mirrors the
paths of the params tree:

  {"a": (in, r), "b": (r, out)}  ->  y = x W + (x a) b        (scale already folded into b)
  {"delta": (in, out)}           ->  y = x W + x delta         (a merged full-rank delta)

so `module.apply({"params": base, "lora": lora_vars}, ...)` runs the adapted model and
omitting "lora" runs the base (the DPO reference). See `safealign_jax.lora`.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

LORA = "lora"

Dtype = jnp.dtype


class Dense(nn.Module):
    """A linear layer `y = x W + b` (W stored (in, out)), LoRA-aware.

    Attributes:
      features: output width.
      use_bias: whether the layer has a bias.
      dtype: compute dtype; `param_dtype`: storage dtype of W and b.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.has_variable(LORA, "a"):
            a = self.get_variable(LORA, "a").astype(self.dtype)
            b = self.get_variable(LORA, "b").astype(self.dtype)
            y = y + jnp.dot(jnp.dot(x, a), b)
        if self.has_variable(LORA, "delta"):
            y = y + jnp.dot(x, self.get_variable(LORA, "delta").astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
                self.dtype
            )
        return y


def conv(
    features: int,
    kernel_size: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    stride: int = 1,
    padding: int | None = None,
) -> nn.Conv:
    """A 2-D convolution on NHWC inputs with PyTorch's symmetric padding (default: "same")."""
    pad = kernel_size // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def group_norm(num_groups: int, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """GroupNorm over NHWC channels, grouped contiguously exactly as torch.nn.GroupNorm."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True):
    """LayerNorm over the last axis, as torch.nn.LayerNorm."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        use_bias=use_bias,
        name=name,
    )
