"""Re-factoring a full delta tree into a rank-r LoRA by truncated SVD.

dW (in, out) = U S V^T; keeping the r largest singular values, a = U_r sqrt(S_r) (in, r) and
b = sqrt(S_r) V_r^T (r, out), so a b is the best rank-r approximation (Eckart-Young) and the
LoRA's scale is 1 (write lora.rank = lora.alpha = r). Layers with min(in, out) < r get zero
padding so every layer has rank r (one rank per LoRA file). The SVD runs on the host in float64
(numpy: no compile per layer shape; a few seconds for all SD1.5 attention layers).
"""

import numpy as np
from flax import traverse_util

from safealign_jax.errors import check


def to_lora(delta: dict, rank: int) -> tuple[dict, dict[str, float]]:
    """(LoRA tree {P: {"a": (in, r), "b": (r, out)}} with scale 1, {"/"-joined P: relative error})
    for a delta tree {P: {"delta": (in, out)}}; relative error = ||dW - a b||_F / ||dW||_F
    (0 for an all-zero delta)."""
    check(isinstance(rank, int) and rank >= 1, f"SVD rank {rank!r} is invalid (expected an integer >= 1).")
    flat, errors = {}, {}
    for path, d in sorted(traverse_util.flatten_dict(delta).items()):
        d = np.asarray(d, np.float64)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        keep = min(rank, s.shape[0])
        root = np.sqrt(s[:keep])
        a = np.zeros((d.shape[0], rank))
        b = np.zeros((rank, d.shape[1]))
        a[:, :keep], b[:keep] = u[:, :keep] * root, root[:, None] * vt[:keep]
        a, b = a.astype(np.float32), b.astype(np.float32)
        norm = float(np.linalg.norm(d))
        residual = float(np.linalg.norm(d - a.astype(np.float64) @ b))
        errors["/".join(path[:-1])] = residual / norm if norm > 0 else 0.0
        flat[(*path[:-1], "a")], flat[(*path[:-1], "b")] = a, b
    return traverse_util.unflatten_dict(flat), errors
