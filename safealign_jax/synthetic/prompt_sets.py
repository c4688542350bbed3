"""The world's prompt lists for the methods that need prompts but no images: the closed-form
cross-attention edit (`safealign_jax.erase`: harmful -> safe prompt pairs, preserved prompts)
and the retain prompts of the preservation term (`dpo.preserve_weight`).

All come from training phrasings only (the evaluation's held-out phrasings stay unseen): the
CoProV2-style pairs' own prompts, and neutral-object scenes.
"""

from __future__ import annotations

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
