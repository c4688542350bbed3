"""Conversion between PyTorch checkpoints (diffusers / transformers names) and Flax params."""

from safealign_jax.convert.checkpoint import read_state_dict
from safealign_jax.convert.names import NameTable, params_from_state_dict, state_dict_from_params

__all__ = ["NameTable", "params_from_state_dict", "read_state_dict", "state_dict_from_params"]
