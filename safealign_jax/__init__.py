"""safealign_jax: safety alignment of Stable Diffusion by preference optimisation, in JAX/Flax.

Importing the package never imports torch.
"""

from safealign_jax.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
