"""Builders of tiny random PyTorch reference models (diffusers / transformers), saved to folders.

Tests import torch only through here, so `import safealign_jax` stays torch-free.
"""

import numpy as np
import torch


def randomise(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter with N(0, std) so zero-initialised layers cannot hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module.eval()


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.transpose(x_nchw.detach().float().numpy(), (0, 2, 3, 1))


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
