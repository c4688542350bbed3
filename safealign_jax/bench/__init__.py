"""Performance of the train step, shared by the trainer and scripts/benchmark.py.

  flops    matmul/conv FLOPs of a function from one jaxpr count (model FLOPs of a train step)
  peak     the device's peak FLOP/s (datasheet table, or a measured matmul on CPU) and MFU
  build    the trainer's train step for a config, ready to compile (real or abstract arguments)
  memory   XLA's memory analysis of the AOT-compiled train step at any preset size, from
           ShapeDtypeStructs only (no weights are materialised)
  cache    the persistent XLA compilation cache
  compare  the side-by-side benchmark of scripts/benchmark.py (worker processes pinned to the
           same CPUs, alternating timed repeats, the JSON report and its table)
  torch_reference   the PyTorch side of the benchmark (imports torch lazily)
"""
