"""Inference timestep grids ("leading", "trailing", "linspace"), as each diffusers scheduler
family builds them in `set_timesteps` (arXiv:2305.08891, Table 2).

The families differ in small ways that change the grid, so each has its own function:
DDIM rounds to integers; Euler keeps "linspace" fractional (float32); DPM-Solver spaces
`num_steps + 1` points and drops the last. All return the grid in sampling order
(descending, noisiest first).
"""

import numpy as np


def ddim_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """int64 timesteps of diffusers' DDIMScheduler.set_timesteps."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1


def euler_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """float32 timesteps of diffusers' Euler(Ancestral)DiscreteScheduler.set_timesteps."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // num_steps
        grid = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32)
        return grid + np.float32(steps_offset)
    grid = np.arange(num_train, 0, -num_train / num_steps).round().astype(np.float32)
    return grid - np.float32(1)


def dpm_timesteps(
    spacing: str, num_train: int, num_steps: int, steps_offset: int, last_timestep: int
) -> np.ndarray:
    """int64 timesteps of diffusers' DPMSolverMultistepScheduler.set_timesteps.

    `last_timestep` is num_train minus the steps cut off by `lambda_min_clipped`.
    """
    if spacing == "linspace":
        grid = np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1]
        return grid.astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (num_steps + 1)
        grid = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1]
        return grid.astype(np.int64) + steps_offset
    return np.arange(last_timestep, 0, -num_train / num_steps).round().astype(np.int64) - 1
