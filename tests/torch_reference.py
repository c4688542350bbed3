"""Builders of tiny random PyTorch reference models (diffusers / transformers), saved to folders.

Tests import torch only through here, so `import safealign_jax` stays torch-free. `randomise`
(every parameter N(0, std)) is the library's, from `safealign_jax.tiny_pipeline`.
"""

import numpy as np
import torch

from safealign_jax.tiny_pipeline import randomise  # noqa: F401  (the tests' N(0, std) initialiser)


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.transpose(x_nchw.detach().float().numpy(), (0, 2, 3, 1))


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
