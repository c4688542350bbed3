"""The world's exact oracle: which object, colour and background an image shows.

Every render is one of objects x colours x backgrounds x offsets templates, so the oracle is the
nearest template in squared pixel distance (an exact classifier on clean renders, and the
Bayes-optimal one under isotropic Gaussian pixel noise). Its features for the world's Frechet
distance are the posterior marginals of object, colour and background under that noise model.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from safealign_jax.synthetic.world import OFFSETS, Scene, World

FEATURE_NOISE = 0.5  # std of the pixel-noise model behind the posterior features


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the oracle sees in a batch of images: indices into the world's tables, (B,) each,
    and `distance` = mean squared pixel error to the nearest template (legibility)."""

    object: np.ndarray
    colour: np.ndarray
    background: np.ndarray
    distance: np.ndarray

    def scenes(self, world: World) -> list[Scene]:
        return [Scene(world.objects[o], world.colours[c], world.backgrounds[b])
                for o, c, b in zip(self.object, self.colour, self.background, strict=True)]


class Oracle:
    """Nearest-template classifier of the world's renders."""

    def __init__(self, world: World):
        self.world = world
        combos = list(itertools.product(range(len(world.objects)), range(len(world.colours)),
                                        range(len(world.backgrounds)), OFFSETS, OFFSETS))
        self.labels = np.array([c[:3] for c in combos], np.int32)  # (T, 3)
        templates = np.stack([
            world.render(Scene(world.objects[o], world.colours[c], world.backgrounds[b]), (r, s))
            for o, c, b, r, s in combos
        ]).reshape(len(combos), -1)
        self.templates = templates  # (T, P)
        self.template_norms = np.sum(templates**2, axis=1)

    def _distances(self, images: np.ndarray) -> np.ndarray:
        """(B, T) mean squared distance of each image (B, 16, 16, 3) in [-1, 1] to each template."""
        x = np.asarray(images, np.float32).reshape(len(images), -1)
        d = np.sum(x**2, axis=1, keepdims=True) - 2.0 * x @ self.templates.T + self.template_norms
        return np.maximum(d, 0.0) / x.shape[1]

    def read(self, images: np.ndarray, batch: int = 256) -> Reading:
        """The nearest template's attributes of every image (processed in chunks of `batch`)."""
        parts = []
        for start in range(0, len(images), batch):
            d = self._distances(images[start:start + batch])
            best = np.argmin(d, axis=1)
            parts.append((self.labels[best], d[np.arange(len(best)), best]))
        labels = np.concatenate([p[0] for p in parts])
        return Reading(labels[:, 0], labels[:, 1], labels[:, 2], np.concatenate([p[1] for p in parts]))

    def features(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """(B, O + C + G) posterior marginals of object, colour and background (the world's
        'Inception features' for a Frechet distance)."""
        world, out = self.world, []
        sizes = (len(world.objects), len(world.colours), len(world.backgrounds))
        pixels = self.templates.shape[1]
        for start in range(0, len(images), batch):
            logits = -self._distances(images[start:start + batch]) * pixels / (2 * FEATURE_NOISE**2)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            marginals = [np.stack([p[:, self.labels[:, k] == v].sum(1) for v in range(n)], 1)
                         for k, n in enumerate(sizes)]
            out.append(np.concatenate(marginals, axis=1))
        return np.concatenate(out).astype(np.float64)


def validate(oracle: Oracle, count: int = 2000, noise: float = 0.25, seed: int = 7) -> dict:
    """Accuracy on held-out random renders: clean, and with N(0, noise^2) pixel noise."""
    world, rng = oracle.world, np.random.default_rng(seed)
    scenes = [Scene(world.objects[rng.integers(len(world.objects))], world.colours[rng.integers(len(world.colours))],
                    world.backgrounds[rng.integers(len(world.backgrounds))]) for _ in range(count)]
    clean = np.stack([world.render_random(s, rng) for s in scenes])
    noisy = clean + rng.normal(0.0, noise, clean.shape).astype(np.float32)
    result = {}
    for name, images in (("clean", clean), ("noisy", noisy)):
        seen = oracle.read(images).scenes(world)
        result[f"accuracy_{name}"] = float(np.mean([a == b for a, b in zip(seen, scenes, strict=True)]))
    result.update(renders=count, noise_std=noise)
    return result
