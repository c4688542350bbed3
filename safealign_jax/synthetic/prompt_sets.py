"""The world's prompt lists for the methods that need prompts but no images: the closed-form
cross-attention edit (`safealign_jax.erase`: harmful -> safe prompt pairs, preserved prompts)
and the retain prompts of the preservation term (`dpo.preserve_weight`).

All come from training phrasings only (the evaluation's held-out phrasings stay unseen): the
CoProV2-style pairs' own prompts, and neutral-object scenes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from safealign_jax.synthetic.data import PairSet
from safealign_jax.synthetic.world import Scene, World, prompt, training_templates


def neutral_prompts(world: World, count: int, seed: int) -> list[str]:
    """`count` prompts of neutral objects in random colours, backgrounds and training phrasings."""
    rng = np.random.default_rng([seed, 41])
    templates = list(training_templates())
    return [prompt(Scene(world.neutral[rng.integers(len(world.neutral))], world.colours[rng.integers(len(world.colours))],
                         world.backgrounds[rng.integers(len(world.backgrounds))]), int(templates[rng.integers(len(templates))]))
            for _ in range(count)]


def edits(pairs: PairSet, categories: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(harmful prompt, its safe rewrite) of every pair, or of the pairs of `categories`."""
    return [(h, s) for h, s, c in zip(pairs.harmful_prompts, pairs.safe_prompts, pairs.categories, strict=True)
            if categories is None or c in categories]


def preserved(pairs: PairSet, world: World, seed: int) -> list[str]:
    """Prompts whose images must not change: the safe rewrites and as many neutral prompts."""
    safe = list(dict.fromkeys(pairs.safe_prompts))
    return safe + neutral_prompts(world, len(safe), seed)


@dataclasses.dataclass(frozen=True)
class EditStates:
    """The text states of the pairs and of the preserved prompts, encoded once for every
    closed-form edit and fusion of the demo (`EditStates.edit`, `merge.fuse`).

    sources / targets: per category, the aligned (M, D) rows of its harmful prompts and of their
    safe rewrites (`erase.prompt_states`); preserved: (P, D) rows of `preserved(...)`.
    """

    sources: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    preserved: np.ndarray

    @classmethod
    def encode(cls, pipe, pairs: PairSet, world: World, preserved_prompts: list[str]) -> EditStates:
        from safealign_jax import erase

        sources, targets = {}, {}
        for category in world.categories:
            harmful, safe = zip(*edits(pairs, (category,)), strict=True)
            sources[category], targets[category] = erase.prompt_states(pipe, list(harmful), list(safe))
        return cls(sources, targets, erase.preserved_states(pipe, preserved_prompts))

    def rows(self, categories, *, keep_other_categories: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sources, targets, preserved) rows of the edit of `categories`: their harmful -> safe
        rows, and the preserved prompts' rows with, if `keep_other_categories`, the other
        categories' harmful rows."""
        others = [self.sources[c] for c in self.sources if c not in categories] if keep_other_categories else []
        return (np.concatenate([self.sources[c] for c in categories]),
                np.concatenate([self.targets[c] for c in categories]), np.concatenate([self.preserved, *others]))

    def edit(self, params: dict, categories, *, keep_other_categories: bool, preserve_weight: float,
             ridge: float) -> tuple[dict, dict]:
        """The closed-form edit of `rows(categories, ...)`: (its delta tree, `erase.edit_fit` of
        its map: the relative residual and preserved-state change), from one solve."""
        from safealign_jax import erase

        rows = self.rows(categories, keep_other_categories=keep_other_categories)
        text_map = erase.edit_map(*rows, preserve_weight=preserve_weight, ridge=ridge)
        return erase.map_delta(params, text_map), erase.edit_fit(*rows, text_map)
