"""Least-squares fusion of experts' cross-attention edits (MACE's fusion), in closed form.

The text-keyed layers (cross-attention to_k / to_v, kernel W (D, out)) see only text states, so
each expert i can be summarised on them by what it does to the states of its own concepts: rows
C_i (M_i, D) with outputs C_i (W + dW_i). The fused delta keeps every expert's mapping of its own
concepts and every preserved state's base output P W, in the ridge least-squares sense of
`safealign_jax.erase`:

    min_W'  sum_i ||C_i W' - C_i (W + dW_i)||^2 + lambda_p ||P W' - P W||^2 + r ||W' - W||_F^2
    W' - W = (sum_i C_i^T C_i + lambda_p P^T P + r I)^{-1} sum_i C_i^T C_i dW_i

(float64 on the host; the D x D system is factored once for all layers). With disjoint concept
rows, no preserved rows and a small ridge, the fusion reproduces each expert on its own concepts
exactly, where averaging would halve them and Co-Merge picks weights without looking at inputs.

The other adapted layers (to_q, to_out, self-attention) do not read text states, so fusion does
not apply there: `fuse` returns only the text-keyed layers, and `combine` fills in the rest from
another merge, e.g.

    text = fuse(params, trees, [states_hate, states_violence], preserved, scales=scales)
    delta = combine(text, comerge(trees, scales, statistics)[0])      # or linear(trees, scales)
"""

from collections.abc import Sequence

import numpy as np
import scipy.linalg
from flax import traverse_util

from safealign_jax.data.tables import column, is_malformed, read_csv
from safealign_jax.errors import check
from safealign_jax.merge.trees import TEXT_KEYED, delta_tree, expert_deltas, layer_name


def fuse(params: dict, deltas: Sequence[dict], concept_states: Sequence[np.ndarray], preserved: np.ndarray | None, *,
         preserve_weight: float = 1.0, ridge: float = 1e-3, layers: str = TEXT_KEYED,
         scales: Sequence[float] | None = None, names: Sequence[str] | None = None) -> dict:
    """The fused delta tree {P: {"delta": (D, out) float32}} of the text-keyed layers the experts adapt.

    Args:
      params: the base UNet's params tree (kernels (in, out)).
      deltas: the experts as delta trees {P: {"delta"}} or LoRA trees {P: {"a", "b"}} (same
        paths and shapes), converted by `expert_deltas` with `scales` (None: 1 each).
      concept_states: per expert, the (M_i, D) text-state rows of its own concepts (e.g.
        `erase.preserved_states(pipe, phrases_i)`: all token positions of its phrases).
      preserved: (P, D) rows whose base outputs are kept; None or (0, D): none.
      preserve_weight: lambda_p >= 0; ridge: r > 0.
      layers: regular expression choosing the text-keyed layers (input width D).
      names: the experts' names for error messages.
    """
    from safealign_jax import erase  # erase imports safealign_jax.merge: import it on use

    dense = expert_deltas(deltas, scales, names)
    check(len(concept_states) == len(dense), f"{len(concept_states)} concept-state sets for {len(dense)} experts.")
    rows = [np.asarray(c) for c in concept_states]
    erase.check_rows("concept states of expert 0", rows[0])
    width = rows[0].shape[1]
    for i, r in enumerate(rows):
        erase.check_rows(f"concept states of expert {i}", r, width)
        check(r.shape[0] > 0, f"expert {i} has no concept states (expected its concepts' text-state rows).")
    preserved = np.zeros((0, width), np.float32) if preserved is None else np.asarray(preserved)
    erase.check_rows("preserved", preserved, width)
    check(preserve_weight >= 0, f"preserve_weight={preserve_weight!r} is invalid (expected >= 0).")
    kernels = {path: k for path, k in erase.text_keyed_kernels(params, layers).items() if path in dense[0]}
    check(bool(kernels), f"no layer the experts adapt matches {layers!r} (the experts have no text-keyed layers, "
          f"they adapt e.g. {layer_name(next(iter(dense[0])))!r}).")
    erase.check_reads_text(kernels, width)
    grams = [erase.gram(r) for r in rows]
    factor = erase.normal_matrix([*grams, preserve_weight * erase.gram(preserved)], width, ridge)

    def pulled(i: int, d: np.ndarray) -> np.ndarray:
        """C_i^T C_i dW_i (D, out), through the rows when there are fewer rows than D."""
        if rows[i].shape[0] < width:
            c = np.asarray(rows[i], np.float64)
            return c.T @ (c @ d)
        return grams[i] @ d

    fused = {}
    for path in kernels:
        rhs = sum(pulled(i, np.asarray(d[path], np.float64)) for i, d in enumerate(dense))
        fused[path] = scipy.linalg.cho_solve(factor, rhs).astype(np.float32)
    return delta_tree(fused)


def combine(text_keyed: dict, rest: dict) -> dict:
    """A delta tree with `text_keyed`'s layers, and `rest`'s (a delta tree of another merge) for
    every layer `text_keyed` does not have."""
    flat = traverse_util.flatten_dict(rest)
    check(all(path[-1] == "delta" for path in flat),
          "combine: the other merge must be a delta tree {P: {'delta'}} (e.g. comerge's or linear's result).")
    return traverse_util.unflatten_dict({**flat, **traverse_util.flatten_dict(text_keyed)})


def read_concepts(path: str, names: Sequence[str]) -> list[list[str]]:
    """Per expert (in the order of `names`) its concept phrases, from a CSV with columns
    expert,phrase. UserError naming the file if a column is missing, a row names an unknown expert
    or an expert has no phrase."""
    columns, rows = read_csv(path)
    expert, phrase = column(path, columns, ("expert",), "expert"), column(path, columns, ("phrase",), "phrase")
    phrases = {name: [] for name in names}
    for line, row in rows:
        check(not is_malformed(row), f"{path}:{line}: row does not have the {len(columns)} fields {columns}.")
        name = row[expert].strip()
        check(name in phrases, f"{path}:{line}: unknown expert {name!r} (the experts are {list(names)}).")
        if row[phrase].strip():
            phrases[name].append(row[phrase].strip())
    for name, found in phrases.items():
        check(bool(found), f"{path}: no phrase for expert {name!r} (fusion needs each expert's concepts).")
    return [phrases[name] for name in names]
