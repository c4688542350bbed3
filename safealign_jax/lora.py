"""LoRA as a pytree that mirrors the paths of the adapted `Dense` layers of a params tree.

For an adapted Dense at module path P (its kernel W at P/kernel, shape (in, out)) the LoRA tree
holds P/a (in, r) and P/b (r, out), float32. The adapted layer computes

    y = x W + s (x a) b,    s = alpha / r,

inside `safealign_jax.models.layers.Dense`, from the "lora" collection that
`safealign_jax.trainable.Trainable` builds (s folded into every b):

    module.apply({"params": params, **Trainable({"lora": tree}, {"lora": cfg.scale}).collections()}, ...)

so a training step differentiates only the small a and b and never materialises a full-size
weight gradient; leaving the collection out runs the base model (the DPO reference). `fold`
writes W + s a b into a copy of the params for export and fast sampling; `fold_delta` does the
same for full-rank deltas (e.g. merged experts), which `Dense` also reads as {"delta": (in, out)}.

Paths are the "/"-joined Flax module names, e.g.
"down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k".
"""

import dataclasses
import numbers
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safealign_jax.errors import UserError, check

# to_q, to_k, to_v and to_out.0 of every attention (self and cross) of the UNet.
DEFAULT_TARGETS = (r"(^|/)(to_q|to_k|to_v|to_out_0)$",)
INITS = ("gaussian", "kaiming_uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Attributes:
    rank: r, the inner width of every adapter (> 0).
    alpha: the scale numerator; s = alpha / rank (default alpha = rank, i.e. s = 1).
    targets: regular expressions searched (`re.search`) in the "/"-joined module path of every
      Dense layer (2-D kernel); a layer matched by any of them is adapted, and each must match
      at least one layer. Anchor them ("^...$") to match whole paths.
    init: how `a` is drawn (`b` is always zero, so the adapted model starts as the base):
      "gaussian": a ~ N(0, std = 1/r), the spec's A ~ N(0, 1/r) and peft's
        init_lora_weights="gaussian" (what the Diffusion-DPO scripts use);
      "kaiming_uniform": a ~ U(-1/sqrt(in), 1/sqrt(in)), peft's default init_lora_weights=True
        (kaiming_uniform with a=sqrt(5) on the (r, in) torch weight).
    """

    rank: int = 4
    alpha: float | None = None
    targets: Sequence[str] = DEFAULT_TARGETS
    init: str = "gaussian"

    def __post_init__(self):
        check(
            isinstance(self.rank, numbers.Integral) and not isinstance(self.rank, bool) and self.rank > 0,
            f"LoRA rank={self.rank!r} is invalid (expected a positive integer).",
        )
        check(
            self.alpha is None or self.alpha > 0,
            f"LoRA alpha={self.alpha!r} is invalid (expected a positive number, or None for alpha = rank).",
        )
        check(self.init in INITS, f"LoRA init={self.init!r} is unknown (expected one of {list(INITS)}).")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        check(len(targets) > 0, "LoRA targets is empty (expected at least one path pattern).")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "rank", int(self.rank))

    @property
    def scale(self) -> float:
        """s = alpha / rank."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def _dense_kernels(params) -> dict[str, tuple[int, int]]:
    """{"/"-joined module path: kernel shape} of every layer with a 2-D kernel, sorted by path."""
    flat = traverse_util.flatten_dict(params)
    kernels = {
        "/".join(path[:-1]): tuple(leaf.shape)
        for path, leaf in flat.items()
        if path[-1] == "kernel" and len(leaf.shape) == 2
    }
    return dict(sorted(kernels.items()))


def targets(params, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """The sorted "/"-joined paths of the Dense layers of `params` matched by any pattern.

    Raises:
      UserError if a pattern is not a valid regular expression or matches no Dense layer.
    """
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    paths = list(_dense_kernels(params))
    check(bool(paths), "the params tree has no Dense layers (2-D kernels) to adapt with LoRA.")
    matched = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise UserError(f"LoRA target pattern {pattern!r} is not a valid regular expression ({e}).") from e
        hits = [p for p in paths if regex.search(p)]
        check(
            bool(hits),
            f"LoRA target pattern {pattern!r} matches none of the {len(paths)} Dense layers "
            f"(paths look like {paths[0]!r}).",
        )
        matched.update(hits)
    return sorted(matched)


def init(key: jax.Array, params, config: LoRAConfig) -> dict:
    """A fresh LoRA tree for `params`: {P: {"a": (in, r), "b": (r, out) zeros}} float32.

    Args:
      key: PRNG key; layer i (in sorted path order) draws `a` from fold_in(key, i).
      params: the base params tree (arrays or ShapeDtypeStructs; only shapes are read).
      config: rank, targets and init.
    """
    kernels = _dense_kernels(params)
    flat = {}
    for i, path in enumerate(targets(params, config.targets)):
        fan_in, fan_out = kernels[path]
        k = jax.random.fold_in(key, i)
        shape = (fan_in, config.rank)
        if config.init == "gaussian":
            a = jax.random.normal(k, shape, jnp.float32) / config.rank
        else:
            bound = 1.0 / fan_in**0.5
            a = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        modules = tuple(path.split("/"))
        flat[(*modules, "a")] = a
        flat[(*modules, "b")] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def factor(delta, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of a delta (in, out) -> a (in, r), b (r, out), float64, with a b the best
    rank-r approximation of delta (Frobenius) and r = min(rank, in, out)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def from_delta(key: jax.Array, params, config: LoRAConfig, delta_tree: dict) -> dict:
    """A LoRA tree for `params` that starts at the rank-r fit of a delta tree (e.g. a closed-form
    concept edit, `safealign_jax.erase`), so that training refines the edit instead of starting
    from zero.

    Every layer of `delta_tree` {P: {"delta": (in, out)}} gets s a b = the best rank-r
    approximation of its delta (`factor`, the scale s divided out; components of a zero singular
    value are left as `init` draws them); the other target layers are initialised as `init`
    does (b = 0).

    Raises:
      UserError if a layer of `delta_tree` is not among `config.targets`' layers of `params`.
    """
    tree = traverse_util.flatten_dict(init(key, params, config))
    root_scale = config.scale**0.5
    for path, d in traverse_util.flatten_dict(delta_tree).items():
        module = path[:-1]
        check(path[-1] == "delta" and (*module, "a") in tree,
              f"the initial delta's layer {'/'.join(module)!r} is not a LoRA target of this model "
              f"(targets {list(config.targets)}).")
        a, b = factor(d, config.rank)
        # Components of a zero singular value keep init's (random a, zero b): a = b = 0 would
        # get no gradient.
        used = np.flatnonzero(np.linalg.norm(b, axis=1) > 1e-6 * max(np.linalg.norm(b, axis=1).max(), 1e-30))
        tree[(*module, "a")] = tree[(*module, "a")].at[:, used].set(jnp.asarray(a[:, used] / root_scale, jnp.float32))
        tree[(*module, "b")] = tree[(*module, "b")].at[used].set(jnp.asarray(b[used] / root_scale, jnp.float32))
    return traverse_util.unflatten_dict(tree)


def delta(lora_tree: dict, scale: float) -> dict:
    """The full-rank deltas {P: {"delta": s a b (in, out)}}, float32."""
    flat = traverse_util.flatten_dict(lora_tree)
    out = {}
    for path, a in flat.items():
        if path[-1] == "a":
            b = flat[(*path[:-1], "b")]
            product = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            out[(*path[:-1], "delta")] = scale * product
    return traverse_util.unflatten_dict(out)


def check_fits(params, tree: dict, where: str) -> None:
    """Raises UserError unless every layer of the LoRA or delta `tree` is a Dense layer of
    `params` whose kernel (in, out) matches: a (in, r) and b (r, out), or delta (in, out).

    The message names `where` (the run), the first layer that does not fit and how many differ.
    """
    kernels = _dense_kernels(params)
    layers: dict[str, dict] = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        layers.setdefault("/".join(path[:-1]), {})[path[-1]] = tuple(leaf.shape)
    misfits = []
    for module, shapes in sorted(layers.items()):
        if module not in kernels:
            misfits.append(f"layer {module!r} is not a Dense layer of this UNet")
            continue
        fan_in, fan_out = kernels[module]
        a, b, d = shapes.get("a"), shapes.get("b"), shapes.get("delta")
        if d is not None and d != (fan_in, fan_out):
            misfits.append(f"layer {module!r} has a delta of shape {d}")
        elif d is None and not (a and b and len(a) == len(b) == 2 and a[0] == fan_in and b[1] == fan_out
                                and a[1] == b[0]):
            misfits.append(f"layer {module!r} has a {a} / b {b}")
        else:
            continue
        misfits[-1] += f", but this UNet's kernel there is {(fan_in, fan_out)}"
    if misfits:
        raise UserError(f"{where}: made for another UNet: {misfits[0]} ({len(misfits)} of {len(layers)} "
                        "adapted layers do not fit).")


def fold_delta(params, delta_tree: dict) -> dict:
    """A copy of `params` with every kernel at a path P of `delta_tree` replaced by W + delta.

    The sum is taken in float32 and stored in the kernel's dtype; `params` is not modified.
    Raises:
      UserError if a path of `delta_tree` is not a Dense layer of `params` or the shapes differ.
    """
    kernels = _dense_kernels(params)
    flat = traverse_util.flatten_dict(params)
    for path, d in traverse_util.flatten_dict(delta_tree).items():
        module = "/".join(path[:-1])
        check(path[-1] == "delta", f"{'/'.join(path)}: expected a delta tree with leaves named 'delta'.")
        check(module in kernels, f"adapter path {module!r} is not a Dense layer of the base model.")
        check(
            tuple(d.shape) == kernels[module],
            f"adapter path {module!r} has a delta of shape {tuple(d.shape)}, expected {kernels[module]} "
            "(the adapter was made for another model).",
        )
        kernel = flat[(*path[:-1], "kernel")]
        flat[(*path[:-1], "kernel")] = (jnp.asarray(kernel, jnp.float32) + d).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def fold(params, lora_tree: dict, scale: float) -> dict:
    """A copy of `params` with W + s a b at every adapted path (the LoRA merged in)."""
    return fold_delta(params, delta(lora_tree, scale))


def count(lora_tree: dict) -> int:
    """Number of scalars in a LoRA (or any) tree."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(lora_tree)))
