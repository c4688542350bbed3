"""ResNet blocks and resamplers, named as diffusers' ResnetBlock2D / Downsample2D / Upsample2D."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.models.layers import Dtype, DtypeModule, conv


class ResnetBlock2D(DtypeModule):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding shift and 1x1 shortcut.

    Attributes:
      out_channels; groups, eps: GroupNorm settings; output_scale_factor: residual divisor.
    Call: x (B, H, W, Cin), temb (B, T) or None -> (B, H, W, out_channels).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(self.group_norm(self.groups, self.eps, "norm1")(x))
        h = self.conv(self.out_channels, 3, "conv1")(h)
        if temb is not None:
            h = h + self.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(self.group_norm(self.groups, self.eps, "norm2")(h))
        h = self.conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Resample2D(nn.Module):
    """A resampler made of one 3x3 convolution named "conv": x -> conv(before_conv(x)), with the
    class's `stride` and `padding`. Fields positional (out_channels, dtype, param_dtype)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    stride = 1
    padding = None

    def before_conv(self, x: jax.Array) -> jax.Array:
        return x

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer = conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", self.stride, self.padding)
        return layer(self.before_conv(x))


class Downsample2D(Resample2D):
    """3x3 convolution with stride 2 and padding 1 (diffusers `use_conv=True, padding=1`)."""

    stride, padding = 2, 1


class Upsample2D(Resample2D):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution."""

    def before_conv(self, x: jax.Array) -> jax.Array:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
