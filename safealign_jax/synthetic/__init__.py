"""A synthetic ground-truth safety world: renders, oracle, users, the tiny base model and metrics."""
