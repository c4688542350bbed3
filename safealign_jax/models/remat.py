"""Rematerialisation (gradient checkpointing) of the UNet: what the backward pass keeps, and at
which granularity the forward is recomputed.

A `remat_policy` names a checkpoint policy and a granularity:
  "none": everything the backward needs is kept;
  "full", "dots", "dots_no_batch": per UNet block (down_blocks_i, mid_block, up_blocks_i): each
    block keeps its inputs and what the policy saves; while a block's backward runs, all of its
    recomputed activations are live (SDXL's up_blocks_0: 3 resnets + 3 x 10 transformer layers);
  "full_per_layer", "dots_per_layer", "dots_no_batch_per_layer": per layer (each ResnetBlock2D
    and BasicTransformerBlock): more inputs are kept (one per layer) but only one layer's
    activations are live while its backward runs.
Wrapping a class with `nn.remat` keeps its module name, so the params tree is the same for every
policy.
"""

import jax
from flax import linen as nn

from safealign_jax.errors import UserError

# jax checkpoint policy of each name: which intermediates of a rematerialised call are saved.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
PER_LAYER = "_per_layer"
UNET_REMAT_POLICIES = tuple(REMAT_POLICIES) + tuple(p + PER_LAYER for p in REMAT_POLICIES if p != "none")


def split(remat_policy: str) -> tuple[str, str]:
    """(policy of each UNet block, policy of each layer), each a key of REMAT_POLICIES:
    "full" -> ("full", "none"), "full_per_layer" -> ("none", "full")."""
    if remat_policy not in UNET_REMAT_POLICIES:
        raise UserError(f"remat_policy={remat_policy!r} is unknown (expected one of {list(UNET_REMAT_POLICIES)}).")
    if remat_policy.endswith(PER_LAYER):
        return "none", remat_policy.removesuffix(PER_LAYER)
    return remat_policy, "none"


def remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """`cls` rematerialised with the checkpoint policy named `policy` (a key of REMAT_POLICIES);
    `cls` itself for "none"."""
    if policy == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy])
