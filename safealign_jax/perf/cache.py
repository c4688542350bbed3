"""The persistent XLA compilation cache: a compiled step is written once and read by every later
run with the same program, so a restarted run or a second sampling job skips compilation."""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache


def enable_compilation_cache(folder: str) -> str:
    """Points JAX's persistent compilation cache at `folder` (created) for every compile that takes
    at least a second; returns the absolute folder. A later call with another folder moves the
    cache of this process there."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != folder:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
