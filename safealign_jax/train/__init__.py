"""Training: device mesh & shardings, train state, the jitted DPO step, Orbax checkpoints, loop."""
