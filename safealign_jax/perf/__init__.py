"""What the trainer measures and speeds up, below both the trainer and the benchmark
(`safealign_jax.bench` imports `train`; `train` imports only this):

  flops    matmul/conv FLOPs of a function from one jaxpr count (model FLOPs of a train step)
  peak     the device's peak FLOP/s (datasheet table, or a measured matmul on CPU) and MFU
  cache    the persistent XLA compilation cache
"""
