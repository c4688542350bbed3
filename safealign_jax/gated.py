"""User-gated PSA: per-category weight deltas mixed per user by learned gates.

    tree = {
      "gate":    {"kernel": (E, C), "bias": (C,)},                     # g(u) = sigmoid(u W + b)
      "experts": {<UNet Dense path>: {"a": (C, in, r), "b": (C, r, out)}},
    }

C = categories (one delta per banned category: a safety expert or a closed-form edit), E = user
embedding width, r = the factor rank of that layer. For a user u the adapted layer computes

    y = x W + sum_c g_c(u) (x a_c) b_c,

per example inside `safealign_jax.models.layers.Dense` (the "lora" collection from `variables`),
so a batch may mix users; `fold_for_user` merges one user's sum into the kernels for sampling.
The factors come from the category delta trees {P: {"delta": (in, out)}} by truncated SVD
(`init`); `category_deltas` goes back. The gate is a torch.nn.Linear(E -> C) followed by a
sigmoid, which is how it is exported (`safealign_jax.convert.gated_files`).
"""

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from safealign_jax import lora
from safealign_jax.errors import UserError, check

GATE_INIT_STD = 0.01  # std of the random gate kernel when `init` is given a key


def _layer_deltas(category_deltas: Sequence[dict]) -> dict[tuple[str, ...], list[np.ndarray | None]]:
    """{layer path: [delta (in, out) float64 or None per category]} over the union of paths."""
    flats = []
    for i, tree in enumerate(category_deltas):
        flat = traverse_util.flatten_dict(tree)
        bad = sorted("/".join(p) for p in flat if p[-1] != "delta")
        if bad:
            raise UserError(f"category {i}: {bad[0]} is not a 'delta' leaf (expected a delta tree "
                            "{path: {'delta': (in, out)}}).")
        flats.append({p[:-1]: np.asarray(v, np.float64) for p, v in flat.items()})
    layers = {}
    for path in sorted(set().union(*flats)):
        values = [flat.get(path) for flat in flats]
        shapes = {v.shape for v in values if v is not None}
        check(len(shapes) == 1 and len(next(iter(shapes))) == 2,
              f"{'/'.join(path)}: the categories' deltas have shapes {sorted(shapes)}, expected one (in, out).")
        layers[path] = values
    return layers


def init(category_deltas: Sequence[dict], embed_dim: int, *, rank: int | None = None,
         init_bias: float = 0.0, key: jax.Array | None = None) -> dict:
    """A gated tree (float32) from C category delta trees {P: {"delta": (in, out)}}.

    Args:
      category_deltas: one delta tree per category, in category order. A path missing from a
        category gets a zero delta there.
      embed_dim: E, the user-embedding width.
      rank: factor rank r per layer (truncated SVD, capped at min(in, out)); None = exact
        (r = min(in, out)).
      init_bias: the gate bias b (every gate starts at sigmoid(init_bias) for all users when the
        kernel is zero).
      key: None = gate kernel zeros; else ~ N(0, GATE_INIT_STD^2).
    """
    check(len(category_deltas) >= 1, "gated PSA needs at least one category delta tree.")
    check(embed_dim >= 1, f"gated PSA embed_dim={embed_dim} must be >= 1.")
    check(rank is None or rank >= 1, f"gated PSA rank={rank} must be >= 1 (or None for exact).")
    layers = _layer_deltas(category_deltas)
    check(bool(layers), "the category delta trees are empty.")
    count = len(category_deltas)
    experts = {}
    for path, values in layers.items():
        fan_in, fan_out = next(v.shape for v in values if v is not None)
        r = min(fan_in, fan_out) if rank is None else min(rank, fan_in, fan_out)
        factors = [lora.factor(np.zeros((fan_in, fan_out)) if v is None else v, r) for v in values]
        experts[(*path, "a")] = jnp.asarray(np.stack([a for a, _ in factors]), jnp.float32)
        experts[(*path, "b")] = jnp.asarray(np.stack([b for _, b in factors]), jnp.float32)
    kernel = jnp.zeros((embed_dim, count), jnp.float32)
    if key is not None:
        kernel = GATE_INIT_STD * jax.random.normal(key, (embed_dim, count), jnp.float32)
    return {"gate": {"kernel": kernel, "bias": jnp.full((count,), init_bias, jnp.float32)},
            "experts": traverse_util.unflatten_dict(experts)}


def category_names(experts: str, categories: str = "") -> list[str]:
    """The gated categories of a config's psa.gated: `categories` (comma-separated) if given,
    else the base names of the `experts` run folders (comma-separated), in gate order."""
    names = [n.strip() for n in categories.split(",") if n.strip()]
    return names or [os.path.basename(os.path.normpath(f.strip())) for f in experts.split(",") if f.strip()]


def check_matches(tree: dict, params: dict, where: str) -> None:
    """Raises UserError when a gated layer is not a Dense layer of `params` of the same shape."""
    kernels = traverse_util.flatten_dict(params)
    experts = traverse_util.flatten_dict(tree["experts"])
    for path, a in experts.items():
        if path[-1] == "a":
            shape = (a.shape[1], experts[(*path[:-1], "b")].shape[2])
            kernel = kernels.get((*path[:-1], "kernel"))
            found = "absent" if kernel is None else f"its kernel is {tuple(kernel.shape)}"
            check(kernel is not None and tuple(kernel.shape) == shape,
                  f"{where}: layer {'/'.join(path[:-1])} {shape} is not a Dense layer of this UNet "
                  f"({found}; another base model?).")


def num_categories(tree: dict) -> int:
    """C, the number of gated categories."""
    return int(tree["gate"]["bias"].shape[0])


def gates(tree: dict, embeddings: jax.Array, hard: bool = False) -> jax.Array:
    """(B, E) user embeddings -> (B, C) gates sigmoid(e W + b), float32; `hard`: each gate
    thresholded at 0.5 (1 where e W + b > 0, else 0), i.e. each category fully on or off."""
    kernel = tree["gate"]["kernel"]
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != kernel.shape[0]:
        raise UserError(f"gated PSA: user embeddings have shape {tuple(embeddings.shape)}, "
                        f"expected (B, {kernel.shape[0]}).")
    logits = jnp.dot(embeddings, kernel, precision=jax.lax.Precision.HIGHEST) + tree["gate"]["bias"]
    return (logits > 0).astype(jnp.float32) if hard else jax.nn.sigmoid(logits)


def fit_gates(embeddings: np.ndarray, category_index: np.ndarray, prefers_safe: np.ndarray,
              num_categories: int, *, l2: float = 1e-3, iterations: int = 50) -> dict:
    """The gate {"kernel": (E, C), "bias": (C,)} fitted to users' preference records by maximum
    likelihood of the Bradley-Terry model DPO itself starts from:

        P(user u prefers the safe image to the harmful one on category c) = sigmoid(u W_c + b_c),

    minimising, per category, the mean logistic loss of its records + l2/2 (|W_c|^2 + b_c^2)
    (Newton's method with step halving, float64). A user's preference on category c is what the
    gate must say: open where the user bans c. The records are harmful-prompt pairs of the
    training users (Sage's rule: chosen = the safe image iff the user bans the category).

    Args:
      embeddings: (N, E) the user embedding of each record.
      category_index: (N,) int, the record's gated category in [0, C).
      prefers_safe: (N,) bool, whether the user chose the safe image.
      num_categories: C; a category without records is a UserError.
    """
    x = np.asarray(embeddings, np.float64)
    category_index, prefers_safe = np.asarray(category_index), np.asarray(prefers_safe, np.float64)
    check(x.ndim == 2 and category_index.shape == prefers_safe.shape == (x.shape[0],),
          f"fit_gates: embeddings {x.shape}, category_index {category_index.shape} and prefers_safe "
          f"{prefers_safe.shape} must be (N, E), (N,), (N,).")
    features = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    weights = np.zeros((features.shape[1], num_categories))
    for c in range(num_categories):
        rows = category_index == c
        check(bool(rows.any()), f"fit_gates: no preference records for category {c}.")
        weights[:, c] = _logistic_newton(features[rows], prefers_safe[rows], l2, iterations)
    return {"kernel": jnp.asarray(weights[:-1], jnp.float32), "bias": jnp.asarray(weights[-1], jnp.float32)}


def _logistic_newton(features: np.ndarray, labels: np.ndarray, l2: float, iterations: int) -> np.ndarray:
    """argmin_w mean(log(1 + exp(-s f.w))) + l2/2 |w|^2 with s = 2 y - 1 (float64 Newton steps,
    halved until the objective falls)."""

    def objective(w):
        return np.mean(np.logaddexp(0.0, -(2 * labels - 1) * (features @ w))) + 0.5 * l2 * w @ w

    w = np.zeros(features.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(features @ w)))
        grad = features.T @ (p - labels) / len(labels) + l2 * w
        hess = (features * (p * (1 - p))[:, None]).T @ features / len(labels) + l2 * np.eye(len(w))
        step, before = np.linalg.solve(hess, grad), objective(w)
        while objective(w - step) > before and np.abs(step).max() > 1e-12:
            step = step / 2
        w = w - step
        if np.abs(grad).max() < 1e-10:
            break
    return w


def variables(tree: dict, embeddings: jax.Array) -> dict:
    """The "lora" collection for `UNet.apply` with per-example gates: {P: {"gated_a": (C, in, r),
    "gated_b": (C, r, out), "gate": (B, C)}} for embeddings (B, E). A UNet batch of k * B rows
    (e.g. [uncond; cond]) reuses row b's gates for rows b, B + b, ... (see `layers.Dense`)."""
    g = gates(tree, embeddings)
    flat = traverse_util.flatten_dict(tree["experts"])
    out = {}
    for path, a in flat.items():
        if path[-1] == "a":
            layer = path[:-1]
            out[(*layer, "gated_a")] = a
            out[(*layer, "gated_b")] = flat[(*layer, "b")]
            out[(*layer, "gate")] = g
    return traverse_util.unflatten_dict(out)


def route(collection: dict, categories: jax.Array) -> dict:
    """The "lora" collection of `variables` with each row's gates limited to the category of its
    pair: row b keeps gate[b, categories[b]] and zeroes the others (categories[b] = -1: all
    zero, the base model).

    Training with it ("category-routed", `psa.gated.route`) makes gate c learn only from the
    pairs about category c. Without it every gate also takes the (noisy) gradient of all the
    other categories' pairs, through whatever small effect its delta has on their prompts,
    which outweighs its own pairs' signal for some categories (README, "User-gated PSA").
    Sampling always uses every gate: the deltas are made to leave other prompts unchanged.

    Args:
      collection: {P: {"gated_a", "gated_b", "gate": (B, C)}} from `variables`.
      categories: (B,) int, the gated category index of each row's pair, or -1.
    """
    flat = traverse_util.flatten_dict(collection)
    gate = next(v for p, v in flat.items() if p[-1] == "gate")
    mask = jax.nn.one_hot(jnp.asarray(categories), gate.shape[1], dtype=gate.dtype)
    return traverse_util.unflatten_dict({p: v * mask if p[-1] == "gate" else v for p, v in flat.items()})


def user_delta(tree: dict, embedding, hard: bool = False) -> dict:
    """One user's full delta tree {P: {"delta": sum_c g_c(u) a_c b_c (in, out)}}, float32
    (`hard`: the gates thresholded, see `gates`)."""
    g = gates(tree, jnp.asarray(embedding, jnp.float32).reshape(1, -1), hard)[0]
    flat = traverse_util.flatten_dict(tree["experts"])
    return traverse_util.unflatten_dict({
        (*path[:-1], "delta"): jnp.einsum("c,cir,cro->io", g, a, flat[(*path[:-1], "b")],
                                          precision=jax.lax.Precision.HIGHEST)
        for path, a in flat.items() if path[-1] == "a"})


def fold_for_user(params: dict, tree: dict, embedding, hard: bool = False) -> dict:
    """A copy of `params` with W + sum_c g_c(u) a_c b_c at every gated layer, for the user whose
    embedding is `embedding` (E,): how one user is sampled and evaluated."""
    return lora.fold_delta(params, user_delta(tree, embedding, hard))


def category_deltas(tree: dict) -> list[dict]:
    """The C delta trees {P: {"delta": a_c b_c (in, out)}} the tree gates, in category order."""
    flat = traverse_util.flatten_dict(tree["experts"])
    products = {path[:-1]: jnp.einsum("cir,cro->cio", a, flat[(*path[:-1], "b")],
                                      precision=jax.lax.Precision.HIGHEST)
                for path, a in flat.items() if path[-1] == "a"}
    return [traverse_util.unflatten_dict({(*p, "delta"): d[c] for p, d in products.items()})
            for c in range(num_categories(tree))]


def freeze_experts(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` for a trainable tree {"gated": tree, ...} whose expert factors stay fixed: they
    get zero updates and no optimizer state (no moments, no weight decay); the rest as before."""

    def labels(trainable):
        out = jax.tree.map(lambda _: "train", trainable)
        out["gated"] = {**out["gated"], "experts": jax.tree.map(lambda _: "frozen", trainable["gated"]["experts"])}
        return out

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
