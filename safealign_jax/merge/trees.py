"""Expert trees as per-layer dense deltas, and the checks that experts can be merged.

An expert is a LoRA tree {P: {"a": (in, r), "b": (r, out)}} with its scale s = alpha / r, or a
full delta tree {P: {"delta": (in, out)}} (its scale multiplies the delta). Every merge method
works on the dense deltas dW = s a b (in, out), float32, keyed by the module path P as a tuple
of Flax module names, and returns a delta tree {P: {"delta": (in, out)}} of the same paths.
"""

from collections.abc import Sequence

import jax
import numpy as np
from flax import traverse_util

from safealign_jax.errors import UserError
from safealign_jax.trainable import expert

Layer = tuple[str, ...]
# The layers that read only the text states: every cross-attention's key and value (kernel (D, out)).
TEXT_KEYED = r"(^|/)attn2/(to_k|to_v)$"


def _names(count: int, names: Sequence[str] | None) -> list[str]:
    return list(names) if names is not None else [f"expert {i}" for i in range(count)]


def check_compatible(trees: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Raises UserError naming the first path or shape where an expert differs from the first one.

    Args:
      trees: the experts' LoRA (or delta) trees; at least one.
      names: how to call the experts in the message (default "expert i").
    """
    names = _names(len(trees), names)
    if not trees:
        raise UserError("no experts to merge (expected at least one LoRA checkpoint).")
    reference = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(trees[0]).items()}
    for name, tree in zip(names[1:], trees[1:], strict=True):
        flat = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}
        for path in sorted(set(reference) | set(flat)):
            where = "/".join(path)
            if path not in flat:
                raise UserError(f"{name} has no {where!r}, which {names[0]} has (experts must adapt the same layers).")
            if path not in reference:
                raise UserError(f"{name} has {where!r}, which {names[0]} has not (experts must adapt the same layers).")
            if flat[path] != reference[path]:
                raise UserError(f"{name} has {where!r} of shape {flat[path]}, but {names[0]} has "
                                f"{reference[path]} (experts must have the same rank and base model).")


def check_same_base(base_models: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Raises UserError naming the first expert trained on another base model than the first
    (`Trained.base_model`, compared by "sha256")."""
    names = _names(len(base_models), names)
    first = base_models[0]
    for name, base in zip(names[1:], base_models[1:], strict=True):
        if base["sha256"] != first["sha256"]:
            raise UserError(f"{name} was trained on base model {base['path']!r} (sha256 {base['sha256'][:12]}), "
                            f"but {names[0]} on {first['path']!r} (sha256 {first['sha256'][:12]}); "
                            "experts must share their base model.")


def expert_deltas(trees: Sequence[dict], scales: Sequence[float] | None = None,
                  names: Sequence[str] | None = None) -> list[dict[Layer, jax.Array]]:
    """Per expert {layer path: dW (in, out) float32}, dW = s a b (LoRA) or s delta (delta tree).

    Checks first that the trees are compatible (`check_compatible`).
    """
    check_compatible(trees, names)
    scales = [1.0] * len(trees) if scales is None else list(scales)
    if len(scales) != len(trees):
        raise UserError(f"{len(scales)} scales given for {len(trees)} experts.")
    out = []
    for tree, scale in zip(trees, scales, strict=True):
        dense = traverse_util.flatten_dict(expert(tree, float(scale)).delta())
        out.append({path[:-1]: leaf for path, leaf in sorted(dense.items())})
    return out


def delta_tree(layers: dict[Layer, jax.Array]) -> dict:
    """{layer path: (in, out)} -> the delta tree {P: {"delta": (in, out)}} read by `Dense`."""
    return traverse_util.unflatten_dict({(*path, "delta"): value for path, value in layers.items()})


def layer_name(path: Layer) -> str:
    """("down_blocks_0", ..., "to_q") -> "down_blocks_0/.../to_q"."""
    return "/".join(path)


def delta_norm(delta: dict) -> float:
    """Frobenius norm of a whole delta (or any) tree: sqrt of the sum over every layer of
    ||dW||_F^2, accumulated in float64."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(delta))))
