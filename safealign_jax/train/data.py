"""The batch-source protocol the loop consumes, and the synthetic in-memory source.

A source is an iterator of dicts of numpy arrays holding THIS process's rows of the global
batch (leading axis = pairs), plus `get_state() -> dict` (JSON-serialisable) and
`set_state(dict)` so a resumed run continues with the next batch. Keys: latents_w, latents_l
(B, H, W, C), encoder_hidden_states (B, S, D), optional added_cond {text_embeds, time_ids}, and
for PSA training (config psa.enable) user_embedding (B, E) float32. Optional attribute
`empty_embedding` (S, D): the empty prompt's text states used by caption dropout (else zeros).

A source object passed to `train.loop.train(config, workdir, source=...)` replaces the config's
one; it yields this process's rows of each global batch (all rows on a single host) of
`train.pairs_per_device x devices` pairs.
"""

import abc
from typing import Protocol

import numpy as np

from safealign_jax.models.embeddings import sdxl_time_ids


class BatchSource(Protocol):
    def __iter__(self): ...

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class SeededBatches(abc.ABC):
    """A source whose global batch i is drawn by `draw(np.random.default_rng([seed, i]), rows)`:
    every process draws the same global batch and keeps its `rows`, so results do not depend on
    how many processes feed it; the state is the batch index."""

    def __init__(self, seed: int, global_rows: int, rows: slice):
        self.seed, self.global_rows, self.rows = seed, global_rows, rows
        self.index = 0

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, n: int) -> dict:
        """The global batch of `n` rows (dict of arrays, or of dicts of arrays)."""

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        return {k: _rows(v, self.rows) for k, v in self.draw(rng, self.global_rows).items()}

    def last_ids(self) -> list[str]:
        """Ids of the rows of the batch returned last: "<batch index>:<global row>"."""
        return [f"{self.index - 1}:{row}" for row in range(self.global_rows)[self.rows]]

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


class SyntheticPairs(SeededBatches):
    """Random latent pairs and text embeddings, deterministic in (seed, batch index, row).

    With `user_dim` > 0 each pair also gets a N(0, I) user_embedding (user_dim,), drawn after the
    other arrays (the LoRA-only stream is unchanged).
    """

    def __init__(self, seed: int, global_rows: int, rows: slice, latent_size: int, channels: int,
                 seq_len: int, context_dim: int, added_cond_dims: tuple[int, int] | None = None,
                 user_dim: int = 0):
        super().__init__(seed, global_rows, rows)
        self.latent_shape = (latent_size, latent_size, channels)
        self.context_shape = (seq_len, context_dim)
        self.added_cond_dims = added_cond_dims
        self.user_dim = user_dim

    def draw(self, rng: np.random.Generator, n: int) -> dict:
        batch = {
            "latents_w": rng.standard_normal((n, *self.latent_shape), np.float32),
            "latents_l": rng.standard_normal((n, *self.latent_shape), np.float32),
            "encoder_hidden_states": rng.standard_normal((n, *self.context_shape), np.float32),
        }
        if self.added_cond_dims:
            pooled, time_ids = self.added_cond_dims
            batch["added_cond"] = {
                "text_embeds": rng.standard_normal((n, pooled), np.float32),
                "time_ids": sdxl_time_ids(n, 1024)[:, :time_ids],
            }
        if self.user_dim:
            batch["user_embedding"] = rng.standard_normal((n, self.user_dim), np.float32)
        return batch


def _rows(value, rows: slice):
    if isinstance(value, dict):
        return {k: v[rows] for k, v in value.items()}
    return value[rows]
