"""Noise levels sigma = sqrt((1 - a) / a) of the training schedule and the inference sigma
grids derived from them (interpolated at timesteps, or Karras et al. 2022's rho=7 grid),
computed with the dtypes diffusers' Euler and DPM-Solver schedulers use.
"""

import numpy as np


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 (T,) sigma per training timestep (ascending in t)."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def interpolate_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """float64 sigmas at (possibly fractional) `timesteps`, linear in t."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0
) -> np.ndarray:
    """float64 (num_steps,) descending sigmas evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """float64 fractional timesteps whose interpolated log-sigma equals log(sigma).

    sigma: (n,); log_sigmas: float32 (T,) log of `train_sigmas`.
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_bounds(
    sigma_min: float | None, sigma_max: float | None, sigmas: np.ndarray
) -> tuple[float, float]:
    """The config's sigma_min / sigma_max, or else the ends of descending `sigmas`."""
    low = sigma_min if sigma_min is not None else sigmas[-1].item()
    high = sigma_max if sigma_max is not None else sigmas[0].item()
    return low, high
