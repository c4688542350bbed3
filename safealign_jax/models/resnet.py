"""ResNet blocks and resamplers, named as diffusers' ResnetBlock2D / Downsample2D / Upsample2D."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.models.layers import Dense, Dtype, conv, group_norm


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding shift and 1x1 shortcut.

    Attributes:
      out_channels; groups, eps: GroupNorm settings; output_scale_factor: residual divisor.
    Call: x (B, H, W, Cin), temb (B, T) or None -> (B, H, W, out_channels).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            h = h + Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2 and padding 1 (diffusers `use_conv=True, padding=1`)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=1)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)
