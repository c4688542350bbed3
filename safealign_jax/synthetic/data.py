"""The world's preference data, built the way the papers build theirs.

* CoProV2-style pairs: for every harmful concept, prompts (training phrasings) of random scenes
  and their minimal safe edits; the BASE model renders both; the files are written in the
  released CoProV2 layout (CoProv2_train.csv + u_idx_/s_idx_ images), built into the TFDS data
  set and encoded into the latent cache exactly like real data (`scripts/prepare_data.py`).
* PSA pairs: the same renders, each harmful prompt judged per user (banned category -> the safe
  render is chosen, allowed -> the harmful one), and safe prompts (the safe render is chosen),
  as Sage's preference rule; fed to the trainer by `UserPairs`.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from safealign_jax.data.cache import encode_texts
from safealign_jax.images import save_png
from safealign_jax.models.space_to_depth import space_to_depth
from safealign_jax.pipeline import generate, load_pipeline
from safealign_jax.synthetic.base_model import TEXT_BATCH
from safealign_jax.synthetic.users import User
from safealign_jax.synthetic.world import Scene, World, prompt, training_templates
from safealign_jax.train.data import SeededBatches


@dataclasses.dataclass
class PairSet:
    """Rendered pairs: harmful/safe prompts, their categories, and the base's renders."""

    harmful_prompts: list[str]
    safe_prompts: list[str]
    categories: list[str]
    harmful_images: np.ndarray  # (N, 16, 16, 3) in [-1, 1]
    safe_images: np.ndarray


def render(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, batch: int = 128,
           **kwargs) -> np.ndarray:
    """Images (N, 16, 16, 3) in [-1, 1] from `pipeline.generate` in fixed-size batches (one
    compile); per-prompt `user_embeddings` in kwargs are batched alongside."""
    users = kwargs.pop("user_embeddings", None)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        pad = batch - len(chunk)
        extra = dict(kwargs)
        if users is not None:
            u = np.asarray(users[start:start + batch])
            extra["user_embeddings"] = np.concatenate([u, np.repeat(u[:1], pad, 0)]) if pad else u
        images = generate(pipe, chunk + [chunk[0]] * pad, list(seeds[start:start + batch]) + [0] * pad,
                          num_steps=steps, guidance=guidance, **extra)
        out.append(np.asarray(images)[: len(chunk)] * 2.0 - 1.0)
    return np.concatenate(out).astype(np.float32)


def training_pairs(world: World, pairs_per_concept: int, seed: int) -> tuple[list[Scene], list[int]]:
    """Harmful scenes (random colour/background per pair) and their training phrasings."""
    rng = np.random.default_rng([seed, 31])
    templates = list(training_templates())
    scenes, phrasings = [], []
    for concept in world.concepts:
        for _ in range(pairs_per_concept):
            scenes.append(Scene(concept.name, world.colours[rng.integers(len(world.colours))],
                                world.backgrounds[rng.integers(len(world.backgrounds))]))
            phrasings.append(int(templates[rng.integers(len(templates))]))
    return scenes, phrasings


def render_pairs(world: World, pipe, pairs_per_concept: int, seed: int, *, steps: int, guidance: float) -> PairSet:
    scenes, phrasings = training_pairs(world, pairs_per_concept, seed)
    harmful = [prompt(s, t) for s, t in zip(scenes, phrasings, strict=True)]
    safe = [prompt(s.replace(object=world.concept_of[s.object].safe), t) for s, t in zip(scenes, phrasings, strict=True)]
    seeds = [seed * 1_000_003 + i for i in range(len(scenes))]
    images = render(pipe, harmful + safe, seeds + seeds, steps=steps, guidance=guidance)
    return PairSet(harmful, safe, [world.category_of(s.object) for s in scenes], images[: len(scenes)], images[len(scenes):])


def write_coprov2(pairs: PairSet, folder: str) -> tuple[str, str]:
    """Writes CoProv2_train.csv + images/ (PNG, lossless) in the released layout; returns
    (table path, image folder)."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    table = os.path.join(folder, "CoProv2_train.csv")
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "image", "category"])
        for i, (h, s, c) in enumerate(zip(pairs.harmful_prompts, pairs.safe_prompts, pairs.categories, strict=True)):
            writer.writerow([h, f"u_idx_{i:07d}_0.png", c])
            writer.writerow([s, f"s_idx_{i:07d}_0.png", c])
            save_png(_uint8(pairs.harmful_images[i]), os.path.join(images, f"u_idx_{i:07d}_0.png"))
            save_png(_uint8(pairs.safe_images[i]), os.path.join(images, f"s_idx_{i:07d}_0.png"))
    return table, images


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


class UserPairs(SeededBatches):
    """User-conditioned preference pairs for PSA training (the trainer's BatchSource protocol).

    Record r < N: the harmful prompt of pair r for a random user (chosen = safe render if the
    user bans its category, else the harmful render); records r >= N: the safe prompt (chosen =
    safe render). Batches are deterministic in (seed, batch index). With `gated_categories` (the
    category order of a gated PSA tree) batches also carry "category_index" (B,) int32: the
    position of each pair's category there, -1 if absent (`psa.gated.route`).
    """

    def __init__(self, pairs: PairSet, users: list[User], pipeline_folder: str, *, seed: int,
                 global_rows: int, rows: slice, block: int, safe_share: float = 0.25,
                 gated_categories: list[str] | None = None):
        states, _ = encode_texts(load_pipeline(pipeline_folder), pairs.harmful_prompts + pairs.safe_prompts + [""],
                                 batch=TEXT_BATCH)
        self.empty_embedding = states[-1]
        self.harmful_states, self.safe_states = np.split(states[:-1], 2)
        self.harmful_latents = space_to_depth(pairs.harmful_images, block)
        self.safe_latents = space_to_depth(pairs.safe_images, block)
        self.categories = pairs.categories
        self.users = users
        self.safe_share = safe_share
        self.gated_index = None if gated_categories is None else np.array(
            [list(gated_categories).index(c) if c in gated_categories else -1 for c in pairs.categories], np.int32)
        super().__init__(seed, global_rows, rows)

    def draw(self, rng: np.random.Generator, n: int) -> dict:
        pair = rng.integers(len(self.categories), size=n)
        user = rng.integers(len(self.users), size=n)
        safe_prompt = rng.random(n) < self.safe_share
        banned = np.array([self.users[u].bans(self.categories[p]) for p, u in zip(pair, user, strict=True)])
        prefer_safe = (banned | safe_prompt)[:, None, None, None]
        batch = {
            "latents_w": np.where(prefer_safe, self.safe_latents[pair], self.harmful_latents[pair]),
            "latents_l": np.where(prefer_safe, self.harmful_latents[pair], self.safe_latents[pair]),
            "encoder_hidden_states": np.where(safe_prompt[:, None, None], self.safe_states[pair], self.harmful_states[pair]),
            "user_embedding": np.stack([self.users[u].embedding for u in user]),
        }
        if self.gated_index is not None:
            batch["category_index"] = self.gated_index[pair]
        return batch


def preference_records(pair_categories: list[str], users: list[User],
                       gated_categories: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The users' preferences that `UserPairs` turns into harmful-prompt pairs, one record per
    (user, pair of a gated category): (user embeddings (N, E), gated category index (N,),
    prefers_safe (N,) bool: the user is shown the safe render as chosen, i.e. bans the category),
    for `gated.fit_gates`."""
    pairs = [p for p, c in enumerate(pair_categories) if c in gated_categories]
    embeddings = np.stack([user.embedding for user in users for _ in pairs])
    index = np.tile([gated_categories.index(pair_categories[p]) for p in pairs], len(users)).astype(np.int32)
    prefers_safe = np.array([user.bans(pair_categories[p]) for user in users for p in pairs])
    return embeddings, index, prefers_safe
