"""Closed-form concept editing of the UNet's cross-attention (the UCE / MACE family), as a delta tree.

The cross-attention key and value layers (".../attn2/to_k", ".../attn2/to_v"; kernel W (D, out),
y = c W) read only the text states c (D per token). Given source rows c_i (text states of harmful
words or prompts) with target rows c*_i (their safe counterparts), preserved rows c_j (safe and
neutral words whose outputs must not move), a preserve weight lambda_p and a ridge r, every such
layer gets the minimiser of

    sum_i ||c_i W' - c*_i W||^2 + lambda_p sum_j ||c_j W' - c_j W||^2 + r ||W' - W||_F^2,

    W' - W = (C^T C + lambda_p P^T P + r I)^{-1} C^T (C* - C) W          (float64 on the host)

with C, C*, P the rows stacked. The D x D system does not depend on the layer, so it is factored
once and every layer costs one (D, D) x (D, out) product. The result is a delta tree
{P: {"delta": (D, out) float32}} like a merge's: `lora.fold_delta` folds it, `merge.to_lora` makes
it a LoRA, `runs.save_trained(workdir, {"delta": tree}, ...)` makes it a run (scripts/erase.py).

    delta = edit_from_prompts(pipe, pipe.unet_params, [("nudity", "dress"), ("gore", "")],
                              preserved=["a cat", "a portrait"])
"""

import re
from collections.abc import Sequence

import numpy as np
import scipy.linalg
from flax import traverse_util

from safealign_jax.data.tables import column, is_malformed, read_csv
from safealign_jax.errors import UserError, check
from safealign_jax.merge.trees import TEXT_KEYED, Layer, delta_norm, delta_tree
from safealign_jax.pipeline import encode_prompts

ENCODE_BATCH = 32  # prompts per text-encoder call (the last call is padded: one compile)
GRAM_CHUNK = 4096  # rows per float64 product when accumulating C^T C

__all__ = ["TEXT_KEYED", "check_reads_text", "check_rows", "delta_norm", "edit_fit", "edit_from_prompts", "edit_map", "gram",
           "map_delta", "normal_matrix", "preserved_states", "prompt_states", "read_edits", "rows_from_prompts", "solve_edit", "text_keyed_kernels",
           "token_counts"]


def _states(pipe, prompts: Sequence[str]) -> np.ndarray:
    """(B, S, D) float32 text states of `prompts`, encoded ENCODE_BATCH at a time."""
    prompts = list(prompts)
    out = []
    for start in range(0, len(prompts), ENCODE_BATCH):
        chunk = prompts[start:start + ENCODE_BATCH]
        padded = chunk + [""] * (min(ENCODE_BATCH, len(prompts)) - len(chunk))
        out.append(np.asarray(encode_prompts(pipe, padded)[0], np.float32)[:len(chunk)])
    return np.concatenate(out)


def token_counts(pipe, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt as the pipeline encodes it: BOS + content + EOS, truncated to the
    tokenizer's length (the first tokenizer's count; SDXL's two CLIP tokenizers agree)."""
    tokenizer = pipe.tokenizers[0]
    encoded = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length)
    return [len(ids) for ids in encoded["input_ids"]]


def prompt_states(pipe, sources: list[str], targets: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Aligned (M, D) float32 text-state rows of source and target prompts.

    States come from `pipeline.encode_prompts` (SDXL: both encoders' states concatenated). A
    source and its target with the same token count are aligned position by position (all S
    positions, BOS to the last padding); otherwise as UCE does: from each prompt's last content
    token (index count - 2; BOS for "") to the end, truncated to the shorter of the two, so EOS
    meets EOS and the padding states meet each other.
    """
    check(len(sources) == len(targets), f"{len(sources)} source prompts but {len(targets)} targets.")
    check(len(sources) > 0, "no edits given (expected at least one source -> target pair).")
    source_states, target_states = _states(pipe, sources), _states(pipe, targets)
    length = source_states.shape[1]
    rows_s, rows_t = [], []
    for s, t, ns, nt in zip(source_states, target_states, token_counts(pipe, sources), token_counts(pipe, targets),
                            strict=True):
        if ns == nt:
            rows_s.append(s)
            rows_t.append(t)
            continue
        i, j = max(ns - 2, 0), max(nt - 2, 0)
        n = length - max(i, j)
        rows_s.append(s[i:i + n])
        rows_t.append(t[j:j + n])
    return np.concatenate(rows_s), np.concatenate(rows_t)


def preserved_states(pipe, prompts: list[str]) -> np.ndarray:
    """(P * S, D) float32: the text states of every token position of every prompt."""
    check(len(prompts) > 0, "no preserved prompts given (pass an empty array to solve_edit instead).")
    states = _states(pipe, prompts)
    return states.reshape(-1, states.shape[-1])


def text_keyed_kernels(params: dict, layers: str = TEXT_KEYED) -> dict[Layer, np.ndarray]:
    """{module path: kernel (D, out)} of every Dense layer (2-D kernel) whose "/"-joined path
    matches `layers` (`re.search`), sorted by path. UserError if the pattern is invalid or matches
    no layer."""
    try:
        regex = re.compile(layers)
    except re.error as e:
        raise UserError(f"layer pattern {layers!r} is not a valid regular expression ({e}).") from None
    kernels = {path[:-1]: leaf for path, leaf in sorted(traverse_util.flatten_dict(params).items())
               if path[-1] == "kernel" and np.ndim(leaf) == 2 and regex.search("/".join(path[:-1]))}
    check(bool(kernels), f"layer pattern {layers!r} matches no Dense layer of the model "
          "(expected the cross-attention key / value layers, e.g. '.../attn2/to_k').")
    return kernels


def gram(rows: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """rows^T other (D, D') in float64 (other = rows by default), accumulated GRAM_CHUNK rows at a
    time so M x D rows never exist in float64 at once."""
    other = rows if other is None else other
    total = np.zeros((rows.shape[1], other.shape[1]))
    for start in range(0, rows.shape[0], GRAM_CHUNK):
        a = np.asarray(rows[start:start + GRAM_CHUNK], np.float64)
        b = np.asarray(other[start:start + GRAM_CHUNK], np.float64)
        total += a.T @ b
    return total


def check_rows(name: str, rows: np.ndarray, width: int | None = None) -> None:
    """UserError unless `rows` is 2-D (rows, D), with D = `width` if given."""
    check(rows.ndim == 2, f"{name} has shape {rows.shape}, expected (rows, D) text states.")
    check(width is None or rows.shape[1] == width, f"{name} has width {rows.shape[1]}, expected {width}.")


def normal_matrix(weighted_grams: Sequence[np.ndarray], width: int, ridge: float):
    """The Cholesky factor (for `scipy.linalg.cho_solve`) of sum(weighted_grams) + ridge I (D, D)."""
    check(ridge > 0, f"ridge={ridge!r} is invalid (expected a positive number).")
    matrix = ridge * np.eye(width)
    for g in weighted_grams:
        matrix += g
    return scipy.linalg.cho_factor(matrix)


def check_reads_text(kernels: dict[Layer, np.ndarray], width: int) -> None:
    """UserError naming the first layer whose input width is not the text states' width D."""
    for path, kernel in kernels.items():
        check(kernel.shape[0] == width, f"layer {'/'.join(path)!r} reads inputs of width {kernel.shape[0]}, but the "
              f"text states have width {width} (only cross-attention to_k / to_v read text states).")


def edit_map(sources: np.ndarray, targets: np.ndarray, preserved: np.ndarray | None, *,
             preserve_weight: float = 1.0, ridge: float = 1e-3) -> np.ndarray:
    """The (D, D) float64 map X = A^{-1} C^T (C* - C) of the text states, A = C^T C +
    lambda_p P^T P + r I: every text-keyed kernel W gets the delta X W (arguments: `solve_edit`)."""
    sources, targets = np.asarray(sources), np.asarray(targets)
    check_rows("sources", sources)
    check(sources.shape == targets.shape and sources.shape[0] > 0,
          f"sources {sources.shape} and targets {targets.shape} must be the same non-empty (rows, D).")
    width = sources.shape[1]
    preserved = np.zeros((0, width), np.float32) if preserved is None else np.asarray(preserved)
    check_rows("preserved", preserved, width)
    check(preserve_weight >= 0, f"preserve_weight={preserve_weight!r} is invalid (expected >= 0).")
    factor = normal_matrix([gram(sources), preserve_weight * gram(preserved)], width, ridge)
    return scipy.linalg.cho_solve(factor, gram(sources, np.asarray(targets, np.float64) - sources))


def edit_fit(sources: np.ndarray, targets: np.ndarray, preserved: np.ndarray | None, x: np.ndarray) -> dict:
    """How well the map `x` (`edit_map`) does what it was solved for, as relative errors:
    "residual" = ||C X - (C* - C)|| / ||C* - C|| over the source rows (0: every source state lands on
    its target; 1: none moves), "preserved_change" = ||P X|| / ||P|| (0: preserved states unchanged).

    One linear map of D-wide states can only move so many concepts while keeping the rest: the
    residual grows with the number of edited concepts, and falls as D grows."""
    sources = np.asarray(sources, np.float64)
    moved = np.asarray(targets, np.float64) - sources
    fit = {"residual": float(np.linalg.norm(sources @ x - moved) / max(np.linalg.norm(moved), 1e-30))}
    if preserved is not None and len(preserved):
        preserved = np.asarray(preserved, np.float64)
        fit["preserved_change"] = float(np.linalg.norm(preserved @ x) / max(np.linalg.norm(preserved), 1e-30))
    return fit


def map_delta(params: dict, x: np.ndarray, layers: str = TEXT_KEYED) -> dict:
    """The delta tree {P: {"delta": (D, out) float32}} = X W of every Dense layer matching
    `layers` (kernel W (D, out)) for the text-state map `x` (D, D) of `edit_map`."""
    kernels = text_keyed_kernels(params, layers)
    check_reads_text(kernels, x.shape[0])
    return delta_tree({path: (x @ np.asarray(kernel, np.float64)).astype(np.float32)
                       for path, kernel in kernels.items()})


def solve_edit(params: dict, sources: np.ndarray, targets: np.ndarray, preserved: np.ndarray | None, *,
               preserve_weight: float = 1.0, ridge: float = 1e-3, layers: str = TEXT_KEYED) -> dict:
    """The delta tree {P: {"delta": (D, out) float32}} of every Dense layer matching `layers`:
    `map_delta` of `edit_map` (callers that also want `edit_fit` call those two themselves).

    Args:
      params: the UNet's params tree (kernels (in, out)).
      sources, targets: (M, D) aligned text-state rows c_i -> c*_i (e.g. from `prompt_states`).
      preserved: (P, D) rows c_j whose outputs are kept (`preserved_states`); None or (0, D): none.
      preserve_weight: lambda_p >= 0.
      ridge: r > 0, the pull of W' towards W (also makes the system well posed).
      layers: regular expression over the "/"-joined module paths; matched layers must read the
        text states (input width D).
    """
    return map_delta(params, edit_map(sources, targets, preserved, preserve_weight=preserve_weight, ridge=ridge),
                     layers)


def rows_from_prompts(pipe, edits: list[tuple[str, str]],
                      preserved: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(sources, targets, preserved) text-state rows of `edits` [(source, target)] (target "" =
    the empty prompt) and of the `preserved` prompts (None if empty), encoded by `pipe`'s text
    encoder(s): the arguments of `solve_edit`, `edit_map` and `edit_fit`."""
    sources, targets = prompt_states(pipe, [s for s, _ in edits], [t for _, t in edits])
    return sources, targets, (preserved_states(pipe, preserved) if preserved else None)


def edit_from_prompts(pipe, params: dict, edits: list[tuple[str, str]], preserved: list[str], *,
                      preserve_weight: float = 1.0, ridge: float = 1e-3, layers: str = TEXT_KEYED) -> dict:
    """`solve_edit` on `rows_from_prompts(pipe, edits, preserved)`."""
    return solve_edit(params, *rows_from_prompts(pipe, edits, preserved), preserve_weight=preserve_weight,
                      ridge=ridge, layers=layers)


def read_edits(path: str) -> list[tuple[str, str]]:
    """[(source, target)] from a CSV with columns source,target (an empty target: erase toward the
    empty prompt). UserError naming the file (and line) if it is missing, lacks a column, has a
    malformed row or an empty source, or holds no edits."""
    columns, rows = read_csv(path)
    source, target = column(path, columns, ("source",), "source"), column(path, columns, ("target",), "target")
    edits = []
    for line, row in rows:
        check(not is_malformed(row), f"{path}:{line}: row does not have the {len(columns)} fields {columns}.")
        check(bool(row[source].strip()), f"{path}:{line}: empty source (expected a word, phrase or prompt).")
        edits.append((row[source].strip(), row[target].strip()))
    check(bool(edits), f"{path}: no edits (expected rows source,target).")
    return edits
