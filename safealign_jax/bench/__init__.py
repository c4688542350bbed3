"""The benchmark of scripts/benchmark.py, built on the trainer (`train`) and its measures
(`safealign_jax.perf`: FLOPs, peak, MFU, compilation cache).

  build    the trainer's train step for a config, ready to compile (real or abstract arguments)
  memory   XLA's memory analysis of the AOT-compiled train step at any preset size, from
           ShapeDtypeStructs only (no weights are materialised)
  compare  the side-by-side benchmark of scripts/benchmark.py (worker processes pinned to the
           same CPUs, alternating timed repeats, the JSON report and its table)
  torch_reference   the PyTorch side of the benchmark (imports torch lazily)
"""
