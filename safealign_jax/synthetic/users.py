"""Synthetic users of the world: banned-category sets and deterministic profile embeddings.

A user's profile embedding (E floats) is what an LLM embedding of a Sage profile stands for: a
fixed random projection of the banned-category indicator plus a smaller per-user component from
the user's other (irrelevant) traits, L2-normalised. Levels L1..L5 are five fixed users from
permissive to banning every category, like PSA's cluster-centre users.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Categories banned at each level, by position in the world's category list (L1 permissive).
LEVEL_BANS = ((), (4,), (4, 5, 2), (4, 5, 2, 3, 6), (0, 1, 2, 3, 4, 5, 6))
TRAIT_WEIGHT = 0.3  # norm of the irrelevant-trait component relative to the ban component


@dataclasses.dataclass(frozen=True)
class User:
    user_id: str
    banned: tuple[str, ...]
    embedding: np.ndarray  # (E,) float32, unit norm

    def bans(self, category: str | None) -> bool:
        return category is not None and category in self.banned


def _embedding(banned_mask: np.ndarray, user_seed: int, directions: np.ndarray) -> np.ndarray:
    traits = np.random.default_rng([user_seed, 11]).standard_normal(directions.shape[1])
    ban = banned_mask.astype(np.float64) @ directions
    vector = ban + TRAIT_WEIGHT * traits / np.linalg.norm(traits) * max(1.0, np.linalg.norm(ban))
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def make_users(categories: tuple[str, ...], count: int, embed_dim: int, seed: int) -> tuple[list[User], list[User]]:
    """(`count` random users, the 5 level users). Random users ban each category with
    probability 0.4 (independently); ids are 'u0000'..; level users 'L1'..'L5'."""
    directions = np.random.default_rng([seed, 5]).standard_normal((len(categories), embed_dim))
    rng = np.random.default_rng([seed, 6])
    users = []
    for i in range(count):
        mask = rng.random(len(categories)) < 0.4
        users.append(User(f"u{i:04d}", tuple(c for c, m in zip(categories, mask, strict=True) if m),
                          _embedding(mask, seed * 100_003 + i, directions)))
    levels = []
    for level, bans in enumerate(LEVEL_BANS, start=1):
        mask = np.zeros(len(categories), bool)
        mask[[b for b in bans if b < len(categories)]] = True
        levels.append(User(f"L{level}", tuple(c for c, m in zip(categories, mask, strict=True) if m),
                           _embedding(mask, seed * 100_003 + 90_000 + level, directions)))
    return users, levels
