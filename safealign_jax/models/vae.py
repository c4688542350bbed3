"""Flax port of diffusers' AutoencoderKL (the SD1.x / SD2.x / SDXL VAE), NHWC.

    mean, logvar = encode(module, params, images)      images (B, H, W, 3) in [-1, 1]
    z = sample_latent(mean, logvar, key)               (B, H/f, W/f, latent_channels)
    unet_latents = config.latents_for_unet(z)          (z - shift_factor) * scaling_factor
    images = decode(module, params, config.latents_for_decoder(unet_latents))

with f = 2 ** (len(block_out_channels) - 1). Module names equal diffusers' attribute names
(`encoder.down_blocks.0.resnets.1.conv1`, `decoder.mid_block.attentions.0.to_q`) so
`DIFFUSERS_NAMES` maps the params tree to checkpoint names.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.convert.checkpoint import read_config, read_state_dict
from safealign_jax.convert.names import params_from_state_dict
from safealign_jax.errors import UserError, check
from safealign_jax.models import space_to_depth
from safealign_jax.models.attention import attend
from safealign_jax.models.latent_scaling import LatentScaling
from safealign_jax.models.layers import Dtype, DtypeModule
from safealign_jax.models.load import DIFFUSERS_NAMES, abstract_params, component_folder
from safealign_jax.models.resnet import Resample2D, ResnetBlock2D, Upsample2D

# diffusers builds every VAE ResnetBlock2D, attention GroupNorm and output GroupNorm with this eps.
VAE_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# Fields of diffusers' AutoencoderKL config that must keep one value.
_FIXED = {"act_fn": ("silu",)}
_IGNORED = {"force_upcast", "sample_size"}


@dataclasses.dataclass(frozen=True)
class VAEConfig(LatentScaling):
    """The structure of an AutoencoderKL (diffusers field names and defaults).

    `latents_mean` / `latents_std` are kept when present (SDXL-style configs) but unused here:
    the latent scaling is `scaling_factor` and `shift_factor` only.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "config.json") -> "VAEConfig":
        """Parses a diffusers AutoencoderKL config dict; `source` names it in errors."""
        cls_name = config.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise UserError(f"{source}: unsupported _class_name={cls_name!r} (this port supports 'AutoencoderKL').")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _FIXED and value not in _FIXED[key]:
                raise UserError(
                    f"{source}: unsupported {key}={value!r} (this port supports "
                    f"{' or '.join(repr(a) for a in _FIXED[key])})."
                )
            if key not in known:
                if value in (None, False):
                    continue
                raise UserError(f"{source}: unknown field {key}={value!r} for an AutoencoderKL.")
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        parsed = cls(**values)
        parsed.validate(source)
        return parsed

    def validate(self, source: str = "config") -> None:
        """Checks the structure is one this port builds; raises UserError otherwise."""
        n = len(self.block_out_channels)
        check(n > 0, f"{source}: block_out_channels must not be empty.")
        for field, types, allowed in (
            ("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", self.up_block_types, "UpDecoderBlock2D"),
        ):
            if len(types) != n:
                raise UserError(f"{source}: {field} has {len(types)} entries, expected {n}.")
            for t in types:
                if t != allowed:
                    raise UserError(f"{source}: unsupported {field} entry {t!r} (supported: {allowed!r}).")
        for ch in self.block_out_channels:
            check(
                isinstance(ch, int) and ch > 0 and ch % self.norm_num_groups == 0,
                f"{source}: block_out_channels entry {ch!r} must be a positive multiple of "
                f"norm_num_groups={self.norm_num_groups}.",
            )
        check(
            isinstance(self.layers_per_block, int) and self.layers_per_block > 0,
            f"{source}: layers_per_block={self.layers_per_block!r} must be a positive int.",
        )
        check(
            isinstance(self.scaling_factor, int | float) and self.scaling_factor != 0,
            f"{source}: scaling_factor={self.scaling_factor!r} must be a non-zero number.",
        )


class VAEAttention(DtypeModule):
    """diffusers' mid-block `Attention` of the VAE: one head of width C over all pixels, with
    GroupNorm in front, biased to_q/to_k/to_v/to_out.0, and a residual connection.

    Call: x (B, H, W, C) -> (B, H, W, C). Attention runs in float32 (diffusers upcasts softmax).
    """

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(self.groups, VAE_EPS, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (self.dense(c, name)(tokens) for name in ("to_q", "to_k", "to_v"))
        out = self.dense(c, "to_out_0")(attend(q, k, v, heads=1, upcast=True))
        return out.reshape(b, h, w, c) + x


class VAEDownsample2D(Resample2D):
    """Zero-pad one row / column at the bottom / right, then a 3x3 stride-2 convolution
    (diffusers' Downsample2D with padding=0, as the VAE encoder builds it)."""

    stride, padding = 2, 0

    def before_conv(self, x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))


class VAEMidBlock(DtypeModule):
    """UNetMidBlock2D without time embedding: resnet, (attention), resnet."""

    add_attention: bool
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = lambda i: ResnetBlock2D(x.shape[-1], self.groups, VAE_EPS, name=f"resnets_{i}", **self.dtypes)  # noqa: E731
        x = resnet(0)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, name="attentions_0", **self.dtypes)(x)
        return resnet(1)(x)


class VAEBlock2D(DtypeModule):
    """`num_layers` resnets to `out_channels`, then the resampler: "down" = the stride-2
    downsampler (diffusers' DownEncoderBlock2D), "up" = the 2x nearest upsampler
    (UpDecoderBlock2D), "" = none (the last block)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, name=f"resnets_{j}", **self.dtypes)(x)
        if self.resample == "down":
            x = VAEDownsample2D(self.out_channels, name="downsamplers_0", **self.dtypes)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self.dtypes)(x)
        return x


class VAECoder(DtypeModule):
    """What the Encoder and the Decoder are made of: conv_in, a stack of VAEBlock2D, the mid
    block and the output head, named as diffusers names them."""

    config: VAEConfig

    def blocks(self, x: jax.Array, channels: tuple[int, ...], num_layers: int, resample: str,
               prefix: str) -> jax.Array:
        """One VAEBlock2D per entry of `channels`, named `{prefix}_{i}`; all but the last resample."""
        for i, ch in enumerate(channels):
            resampler = resample if i < len(channels) - 1 else ""
            x = VAEBlock2D(ch, num_layers, self.config.norm_num_groups, resampler, name=f"{prefix}_{i}",
                           **self.dtypes)(x)
        return x

    def mid_block(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return VAEMidBlock(cfg.mid_block_add_attention, cfg.norm_num_groups, name="mid_block", **self.dtypes)(x)

    def head(self, x: jax.Array, features: int) -> jax.Array:
        """conv_norm_out -> SiLU -> conv_out to `features` channels."""
        x = nn.silu(self.group_norm(self.config.norm_num_groups, VAE_EPS, "conv_norm_out")(x))
        return self.conv(features, 3, "conv_out")(x)


class Encoder(VAECoder):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), before quant_conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = self.conv(cfg.block_out_channels[0], 3, "conv_in")(x)
        x = self.blocks(x, cfg.block_out_channels, cfg.layers_per_block, "down", "down_blocks")
        return self.head(self.mid_block(x), 2 * cfg.latent_channels)


class Decoder(VAECoder):
    """Latents (B, h, w, latent_channels) after post_quant_conv -> images (B, h*f, w*f, out_channels)."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = self.mid_block(self.conv(channels[0], 3, "conv_in")(z))
        x = self.blocks(x, channels, cfg.layers_per_block + 1, "up", "up_blocks")
        return self.head(x, cfg.out_channels)


class AutoencoderKL(DtypeModule):
    """diffusers' AutoencoderKL. Methods (use with `module.apply(..., method=...)`, or the
    `encode` / `decode` functions of this module):

      encode(images (B, H, W, in_channels)) -> (mean, logvar), each (B, H/f, W/f, latent_channels)
        float32, logvar clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution;
      decode(z (B, h, w, latent_channels)) -> images (B, h*f, w*f, out_channels) float32.
    `__call__` decodes the encoded mean (used to initialise all parameters).
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, **self.dtypes)
        self.decoder = Decoder(cfg, **self.dtypes)
        # Named by the attributes (setup forbids explicit names).
        self.quant_conv = self.conv(2 * cfg.latent_channels, 1, None) if cfg.use_quant_conv else None
        self.post_quant_conv = self.conv(cfg.latent_channels, 1, None) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


def encode(module: AutoencoderKL, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of the latent distribution of NHWC `images` in [-1, 1] (see AutoencoderKL)."""
    return module.apply({"params": params}, images, method=AutoencoderKL.encode)


def decode(module: AutoencoderKL, params: dict, z: jax.Array) -> jax.Array:
    """NHWC images (about [-1, 1], unclipped) from VAE latents `z` (not UNet-scaled)."""
    return module.apply({"params": params}, z, method=AutoencoderKL.decode)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (DiagonalGaussianDistribution.sample)."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_name(name: str) -> str:
    """A pre-0.14 diffusers attention name (query/key/value/proj_attn), which many hub VAEs still
    carry, renamed to to_q/to_k/to_v/to_out.0 as diffusers does when loading it; others as they are."""
    parts = name.split(".")
    if ".attentions." in name and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION_NAMES:
        return ".".join([*parts[:-2], _DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return name


def load_vae(
    folder: str,
    subfolder: str = "vae",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
) -> tuple[nn.Module, dict]:
    """Loads a diffusers AutoencoderKL as (Flax module, params); a `SpaceToDepthAutoencoder`
    config (pixel-space toy pipelines, see `space_to_depth`) gives that exact map and no params.

    Args:
      folder: a diffusers `vae/` folder or a pipeline folder containing `subfolder`.
      dtype: compute dtype; param_dtype: dtype the weights are stored in.
      variant: weights variant ("fp16"); default: the plain file, else the fp16 one.
    Returns:
      (module, params) with params a tree of numpy arrays in `param_dtype`; `module.config`
      carries scaling_factor / shift_factor.
    """
    folder = component_folder(folder, subfolder)
    raw = read_config(folder)
    if raw.get("_class_name") == space_to_depth.CLASS_NAME:  # exact pixel-space stand-in
        s2d = space_to_depth.SpaceToDepthConfig.from_diffusers(raw, os.path.join(folder, "config.json"))
        return space_to_depth.SpaceToDepthAutoencoder(s2d, dtype=dtype, param_dtype=param_dtype), {}
    config = VAEConfig.from_diffusers(raw, os.path.join(folder, "config.json"))
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    f = config.downsample_factor
    expected = abstract_params(module, jnp.zeros((1, f, f, config.in_channels), jnp.float32))
    weights = read_state_dict(folder, "diffusion_pytorch_model", variant)
    state_dict = {_current_name(name): array for name, array in weights.items()}
    params = params_from_state_dict(expected, state_dict, DIFFUSERS_NAMES, folder)
    return module, params
