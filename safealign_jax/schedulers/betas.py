"""The training noise schedule (betas, cumulative alphas) computed as diffusers computes it.

Host-side numpy in float32 at the same points where diffusers' schedulers use torch float32,
so the tables agree with diffusers' to the last bit or two (torch.linspace and numpy's
linspace may round the last bit differently).
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from safealign_jax.schedulers.config import BETA_SCHEDULES, SchedulerConfig


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" (GLIDE cosine) betas, diffusers' `betas_for_alpha_bar`."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(
            1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
            max_beta,
        )
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, np.float32)


def cumulative_alphas(betas: np.ndarray) -> np.ndarray:
    """float32 (T,) alphas_cumprod = cumprod(1 - betas) of float32 betas.

    Accumulated in float64 and rounded per entry, as torch.cumprod does for float32 on CPU.
    """
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales float32 (T,) betas so the last step has zero SNR (arXiv:2305.08891, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(cumulative_alphas(betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def train_betas(config: SchedulerConfig, fields: Mapping[str, Any]) -> np.ndarray:
    """float32 (num_train_timesteps,) betas from resolved scheduler `fields`.

    Reads num_train_timesteps, trained_betas, beta_schedule, beta_start, beta_end and
    rescale_betas_zero_snr; refuses values diffusers' schedulers do not all implement.
    """
    steps = config.number(fields, "num_train_timesteps", integer=True)
    if steps < 2:
        raise config.error("num_train_timesteps", steps, "at least 2")
    if fields["trained_betas"] is not None:
        try:
            betas = np.asarray(fields["trained_betas"], np.float32)
        except (TypeError, ValueError):
            betas = np.zeros((0,), np.float32)
        if betas.shape != (steps,) or not np.all((betas >= 0) & (betas < 1)):
            raise config.error(
                "trained_betas",
                f"<{betas.size} values>",
                f"{steps} values in [0, 1) (num_train_timesteps)",
            )
    else:
        schedule = config.choice(fields, "beta_schedule", BETA_SCHEDULES)
        start = config.number(fields, "beta_start")
        end = config.number(fields, "beta_end")
        if schedule == "linear":
            betas = np.linspace(start, end, steps).astype(np.float32)
        elif schedule == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, steps).astype(np.float32) ** 2
        else:
            betas = _cosine_betas(steps)
    if config.flag(fields, "rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas
