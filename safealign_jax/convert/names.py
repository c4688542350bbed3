"""The name table: Flax parameter paths <-> PyTorch state-dict names, both directions.

Flax module names are chosen to equal the PyTorch attribute names, except that an entry of a
PyTorch `ModuleList` / `Sequential` called `x` with index `n` is the Flax module `x_n`. A table
therefore only lists which names are such lists; everything else follows:

  ("down_blocks_0", "attentions_1", "proj_in", "kernel")  <->  "down_blocks.0.attentions.1.proj_in.weight"

Leaves: `kernel` <-> `weight` (Linear (out, in) <-> (in, out); Conv OIHW <-> HWIO), LayerNorm /
GroupNorm `scale` <-> `weight`, `embedding` <-> `weight`, `bias` <-> `bias`.
"""

import dataclasses
import re

import jax
import numpy as np
from flax import traverse_util

from safealign_jax.convert.files import key_problems
from safealign_jax.errors import UserError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class NameTable:
    """Maps Flax paths to PyTorch names for one model family.

    Attributes:
      list_modules: PyTorch names of ModuleLists / Sequentials (their Flax entries are `name_i`).
      prefix: prepended to every PyTorch name (e.g. "text_model." handled by the module tree).
    """

    list_modules: frozenset[str]
    prefix: str = ""

    def torch_name(self, path: tuple[str, ...]) -> str:
        """The PyTorch state-dict name of the Flax parameter at `path`."""
        *modules, leaf = path
        parts = []
        for name in modules:
            match = _INDEXED.match(name)
            if match and match.group(1) in self.list_modules:
                parts.extend(match.groups())
            else:
                parts.append(name)
        if leaf not in _LEAF_TO_TORCH:
            raise ValueError(f"no PyTorch name for Flax leaf {'/'.join(path)}")
        parts.append(_LEAF_TO_TORCH[leaf])
        return self.prefix + ".".join(parts)


def _kernel_layout(array: np.ndarray, leaf: str, conv_axes: tuple[int, ...]) -> np.ndarray:
    """A kernel transposed: conv (4-d) by `conv_axes`, linear (2-d) swapped; other leaves as is."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, conv_axes)
    return array.T if leaf == "kernel" and array.ndim == 2 else array


def torch_to_flax_array(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout for a tensor stored at Flax leaf name `leaf` (conv OIHW -> HWIO)."""
    return _kernel_layout(array, leaf, (2, 3, 1, 0))


def flax_to_torch_array(array: np.ndarray, leaf: str) -> np.ndarray:
    """Flax layout -> PyTorch layout; the inverse of `torch_to_flax_array` (conv HWIO -> OIHW)."""
    return _kernel_layout(array, leaf, (3, 2, 0, 1))


def params_from_state_dict(
    expected: dict, state_dict: dict[str, np.ndarray], table: NameTable, source: str
) -> dict:
    """Fills the Flax params tree shaped like `expected` from a PyTorch `state_dict`.

    Args:
      expected: the Flax params tree of ShapeDtypeStructs (e.g. from `jax.eval_shape(init)`).
      state_dict: {PyTorch name: array}.
      table: the family's name table.
      source: the file the tensors came from, for error messages.
    Returns:
      The params tree of numpy arrays in the expected dtypes.
    Raises:
      UserError naming missing / unexpected tensors or shape mismatches.
    """
    flat = traverse_util.flatten_dict(expected)
    params, missing, mismatched, consumed = {}, [], [], set()
    for path, spec in flat.items():
        name = table.torch_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        consumed.add(name)
        array = torch_to_flax_array(np.asarray(state_dict[name]), path[-1])
        if array.shape != tuple(spec.shape):
            torch_shape = tuple(state_dict[name].shape)
            mismatched.append(f"{name} has shape {torch_shape}, expected {tuple(flax_to_torch_array(np.empty(spec.shape), path[-1]).shape)}")
            continue
        params[path] = array.astype(spec.dtype)
    unexpected = sorted(set(state_dict) - consumed)
    problems = key_problems(missing, unexpected, mismatched, "tensor")
    if problems:
        raise UserError(f"{source}: does not match the model config: " + "; ".join(problems) + ".")
    return traverse_util.unflatten_dict(params)


def state_dict_from_params(params: dict, table: NameTable) -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy arrays, PyTorch layouts) of a Flax params tree."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {
        table.torch_name(path): np.ascontiguousarray(flax_to_torch_array(np.asarray(v), path[-1]))
        for path, v in flat.items()
    }


# The diffusers UNet / VAE table: the ModuleList / Sequential attribute names of their modules.
DIFFUSERS_NAMES = NameTable(
    frozenset({
        "down_blocks", "up_blocks", "attentions", "resnets", "downsamplers", "upsamplers",
        "transformer_blocks", "to_out", "net",
    })
)
