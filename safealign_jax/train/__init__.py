"""Training: device mesh & shardings, train state, the jitted DPO step, loop (checkpoints: `safealign_jax.runs`)."""
