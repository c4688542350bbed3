"""The down, mid and up blocks of UNet2DConditionModel (diffusers names).

Each down block returns (hidden, skips) where skips holds the output after every resnet(/attention)
and after the downsampler; each up block consumes as many skips as it has resnets.
Shapes: hidden (B, H, W, C), temb (B, T), context (B, S, D), user_tokens (B, N, D) or None.
"""

import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.models.attention import Transformer2DModel
from safealign_jax.models.layers import Dtype
from safealign_jax.models.remat import REMAT_POLICIES, remat  # noqa: F401 (REMAT_POLICIES: re-exported)
from safealign_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class _Block(nn.Module):
    """Fields shared by all blocks. layer_remat: checkpoint policy of each ResnetBlock2D and
    BasicTransformerBlock (a key of remat.REMAT_POLICIES; "none" = not rematerialised)."""

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layer_remat: str = "none"

    def resnet(self, i: int, out_channels: int | None = None) -> ResnetBlock2D:
        return remat(ResnetBlock2D, self.layer_remat)(
            out_channels or self.out_channels, self.groups, self.eps, self.output_scale_factor,
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}",
        )

    def transformer(self, i: int, channels: int | None = None) -> Transformer2DModel:
        channels = channels or self.out_channels
        return Transformer2DModel(
            self.heads, channels // self.heads, self.transformer_layers, self.use_linear_projection,
            self.upcast_attention, self.groups, self.attention,
            dtype=self.dtype, param_dtype=self.param_dtype, layer_remat=self.layer_remat,
            name=f"attentions_{i}",
        )


class DownBlock(_Block):
    """CrossAttnDownBlock2D (has_attention) or DownBlock2D; `add_downsample` for all but the last."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, user_tokens=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.has_attention:
                x = self.transformer(i)(x, context, user_tokens)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) num_layers times."""

    @nn.compact
    def __call__(self, x, temb, context, user_tokens=None):
        x = self.resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(i)(x, context, user_tokens)
            x = self.resnet(i + 1)(x, temb)
        return x


class UpBlock(_Block):
    """CrossAttnUpBlock2D (has_attention) or UpBlock2D; skips are consumed last-first."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, user_tokens=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.has_attention:
                x = self.transformer(i)(x, context, user_tokens)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x

