"""Tiny random diffusers pipelines (SD-like and SDXL-like) saved to folders, for end-to-end tests:
the library's `safealign_jax.tiny_pipeline` writers, saved as tmp/sd and tmp/sdxl."""

from safealign_jax.tiny_pipeline import write_sd, write_sdxl


def build_sd(tmp) -> str:
    """A tiny SD1-like pipeline (DDIM scheduler) saved to tmp/sd; returns the folder."""
    return write_sd(tmp / "sd")


def build_sdxl(tmp) -> str:
    """A tiny SDXL-like pipeline (Euler scheduler) saved to tmp/sdxl; returns the folder."""
    return write_sdxl(tmp / "sdxl")
