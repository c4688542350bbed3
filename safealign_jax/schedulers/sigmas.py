"""Noise levels sigma = sqrt((1 - a) / a) of the training schedule and the inference sigma
grids derived from them (interpolated at timesteps, or Karras et al. 2022's rho=7 grid),
computed with the dtypes diffusers' Euler and DPM-Solver schedulers use, and the config fields
those two schedulers share.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from safealign_jax.schedulers.config import SchedulerConfig

# The diffusers `__init__` defaults of the sigma fields Euler and DPM-Solver share.
SIGMA_DEFAULTS = {
    "timestep_spacing": "linspace",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "final_sigmas_type": "zero",
}
FINAL_SIGMAS = ("zero", "sigma_min")


def sigma_alphas(alphas_cumprod: np.ndarray, rescaled_to_zero_snr: bool) -> np.ndarray:
    """float32 (T,) alphas_cumprod as the sigma schedulers use them: a copy whose last entry (0
    after `rescale_betas_zero_snr`) is 2**-24 when `rescaled_to_zero_snr`, so its sigma is finite."""
    alphas = alphas_cumprod.copy()
    if rescaled_to_zero_snr:
        alphas[-1] = 2.0**-24
    return alphas


def with_final_sigma(
    sigmas: np.ndarray, alphas_cumprod: np.ndarray, final_sigmas_type: str
) -> np.ndarray:
    """float32 (n+1,): the n inference `sigmas`, then the final one, 0 ("zero") or the smallest
    training sigma ("sigma_min")."""
    a_0 = alphas_cumprod[0]
    last = np.sqrt((1 - a_0) / a_0) if final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32)


def config_sigma_bounds(
    config: SchedulerConfig, fields: Mapping[str, Any]
) -> tuple[float | None, float | None]:
    """The resolved `fields`' (sigma_min, sigma_max) for a Karras grid, each a number or None."""
    return tuple(
        None if fields[name] is None else config.number(fields, name)
        for name in ("sigma_min", "sigma_max")
    )


def require_plain_sigmas(config: SchedulerConfig, fields: Mapping[str, Any], sampler: str) -> None:
    """Refuses the sigma grids not implemented here (exponential, beta)."""
    for name in ("use_exponential_sigmas", "use_beta_sigmas"):
        config.require(fields, name, False, sampler)


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


def karras_grid(
    bounds: tuple[float | None, float | None],
    ends: np.ndarray,
    train: np.ndarray,
    num_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (num_steps,) Karras sigmas, their float64 fractional timesteps).

    bounds: (sigma_min, sigma_max), None for the end of descending `ends`; train: float32 (T,)
    `train_sigmas`.
    """
    sigmas = karras_sigmas(*karras_bounds(*bounds, ends), num_steps)
    return sigmas, sigma_to_t(sigmas, np.log(train))


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
