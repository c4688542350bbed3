"""The latent scaling that autoencoder configs share: between the autoencoder's latents z and the
latents the UNet is trained on."""

import jax


class LatentScaling:
    """Mixin of an autoencoder config with fields `scaling_factor` (float) and `shift_factor`
    (float or None = 0)."""

    scaling_factor: float
    shift_factor: float | None

    def latents_for_unet(self, z: jax.Array) -> jax.Array:
        """Autoencoder latents -> the latents the UNet is trained on: (z - shift_factor) * scaling_factor."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def latents_for_decoder(self, latents: jax.Array) -> jax.Array:
        """The inverse of `latents_for_unet`."""
        return latents / self.scaling_factor + (self.shift_factor or 0.0)
