"""An exact, parameter-free stand-in for the VAE: space-to-depth (pixel unshuffle).

Used by pixel-space toy pipelines (the synthetic world): a `vae/config.json` with
`"_class_name": "SpaceToDepthAutoencoder"` makes `load_vae` return this module. Images
(B, H, W, C) in [-1, 1] map to latents (B, H/f, W/f, f*f*C) and back without loss, with the same
`encode` / `decode` / config interface as `AutoencoderKL`, so the pipeline, the latent cache and
the trainer need no special case.
"""

import dataclasses

import jax
import jax.numpy as jnp

from safealign_jax.errors import UserError
from safealign_jax.models.latent_scaling import LatentScaling
from safealign_jax.models.layers import DtypeModule

CLASS_NAME = "SpaceToDepthAutoencoder"
LOGVAR = -60.0  # an exact encoder: exp(LOGVAR / 2) ~ 1e-13 posterior std


def space_to_depth(images, block: int):
    """(B, H, W, C) -> (B, H/f, W/f, f*f*C) with f = `block` (numpy or jax arrays, type kept)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, h // block, w // block, block * block * c)


def depth_to_space(latents, block: int, channels: int):
    """The inverse of `space_to_depth`: (B, h, w, f*f*C) -> (B, h*f, w*f, C)."""
    b, h, w, _ = latents.shape
    return latents.reshape(b, h, w, block, block, channels).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, h * block, w * block, channels)


@dataclasses.dataclass(frozen=True)
class SpaceToDepthConfig(LatentScaling):
    block_size: int = 2
    in_channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float | None = None

    @property
    def downsample_factor(self) -> int:
        return self.block_size

    @property
    def latent_channels(self) -> int:
        return self.block_size**2 * self.in_channels

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "config.json") -> "SpaceToDepthConfig":
        values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        parsed = cls(**values)
        if not (isinstance(parsed.block_size, int) and parsed.block_size >= 1):
            raise UserError(f"{source}: block_size={parsed.block_size!r} must be a positive integer.")
        return parsed

    def to_diffusers(self) -> dict:
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}


class SpaceToDepthAutoencoder(DtypeModule):
    """encode: (B, H, W, C) -> (mean (B, H/f, W/f, f*f*C), logvar = LOGVAR); decode: the inverse."""

    config: SpaceToDepthConfig

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = space_to_depth(images, self.config.block_size).astype(jnp.float32)
        return z, jnp.full_like(z, LOGVAR)

    def decode(self, z: jax.Array) -> jax.Array:
        return depth_to_space(z, self.config.block_size, self.config.in_channels).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])
