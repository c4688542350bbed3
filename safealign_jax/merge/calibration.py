"""Co-Merge calibration: per adapted layer, statistics of its input activations with each expert.

Every `safealign_jax.models.layers.Dense` sows, when the "calibration" collection is mutable, the
per-input-channel sums of |x| and x^2 and its row count. `calibrate` runs the calibration batches
through the model once per expert (the expert's LoRA applied, one jit compile for all
experts, batches accumulated on device) and returns per expert {P: (in,)}:
    "mean_abs": E|x_k|          (docs/METHODS.md section 2)
    "rms":      sqrt(E x_k^2)
over all input rows of the layer (every batch element, pixel / token position and call). All batches of one expert run in one
compiled `lax.scan`. The batches are shared by all experts (Co-Merge's calibration set), or one
list per expert, e.g. its own category's prompts (`cache_batches(..., category=...)`), so that
an expert's statistic measures the inputs it was trained to change.

`cache_batches` builds that calibration set for a UNet: harmful prompts of all categories
(their text states from the latent cache), random timesteps t ~ U{0..T-1} and noise eps ~ N(0, I),
the sample being the noised cached latent of the harmful image (x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps, "noised") or the noise alone ("noise").
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safealign_jax.errors import UserError, check
from safealign_jax.merge.trees import check_compatible
from safealign_jax.models.embeddings import sdxl_time_ids
from safealign_jax.models.layers import CALIBRATION
from safealign_jax.schedulers import DDPMSchedule, add_noise
from safealign_jax.trainable import expert

STATISTICS = ("mean_abs", "rms")
LATENTS = ("noised", "noise")


def unet_apply(module) -> Callable:
    """apply(variables, batch, mutable) for `calibrate` from a UNet module; batch = {"sample"
    (B, h, w, C), "timesteps" (B,), "encoder_hidden_states" (B, S, D), optional "added_cond"}."""

    def apply(variables, batch, mutable):
        return module.apply(variables, batch["sample"], batch["timesteps"], batch["encoder_hidden_states"],
                            added_cond=batch.get("added_cond"), mutable=mutable)

    return apply


def calibrate(apply: Callable, params: dict, trees: Sequence[dict], scales: Sequence[float] | None,
              batches: Sequence[dict] | Sequence[Sequence[dict]], statistic: str = "mean_abs") -> list[dict]:
    """Per expert {P: (in,) float32}, the input statistic of every layer P the experts adapt.

    Args:
      apply: apply(variables, batch, mutable) -> (output, mutated collections), e.g. `unet_apply`.
      params: the base model's params.
      trees: the experts' LoRA trees (same paths and shapes), or delta trees.
      scales: their scales alpha / rank (None: 1 each).
      batches: the calibration inputs, each a dict pytree of arrays of the same shapes, run through
        every expert; or one such list per expert (expert i sees only batches[i]).
      statistic: "mean_abs" or "rms".
    """
    check(statistic in STATISTICS,
          f"calibration statistic {statistic!r} is unknown (expected one of {list(STATISTICS)}).")
    check(len(batches) > 0, "no calibration batches (expected at least one).")
    check_compatible(trees)
    scales = [1.0] * len(trees) if scales is None else scales
    check(len(scales) == len(trees), f"{len(scales)} scales given for {len(trees)} experts.")
    layers = sorted({path[:-1] for path in traverse_util.flatten_dict(trees[0])})
    per_expert = not isinstance(batches[0], Mapping)
    if per_expert:
        check(len(batches) == len(trees), f"{len(batches)} calibration batch lists for {len(trees)} experts.")
        check(all(len(b) > 0 for b in batches), "an expert has no calibration batches (expected at least one each).")
    stacked = [_stack(b) for b in batches] if per_expert else [_stack(batches)] * len(trees)

    def sums(params, collection, batch):
        _, state = apply({"params": params, "lora": collection}, batch, mutable=[CALIBRATION])
        flat = traverse_util.flatten_dict(state[CALIBRATION])
        missing = [layer for layer in layers if (*layer, "count") not in flat]
        if missing:
            raise UserError(f"layer {'/'.join(missing[0])!r} saw no calibration inputs (not a Dense of this model?).")
        return {layer: {name: flat[(*layer, name)] for name in ("abs_sum", "sq_sum", "count")} for layer in layers}

    @jax.jit
    def run(params, tree, scale, stacked):
        collection = expert(tree, scale).collections()["lora"]
        first = jax.tree.map(lambda x: x[0], stacked)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, params, collection, first))

        def body(total, batch):
            return jax.tree.map(jnp.add, total, sums(params, collection, batch)), None

        total, _ = jax.lax.scan(body, zeros, stacked)
        if statistic == "mean_abs":
            return {layer: t["abs_sum"] / t["count"] for layer, t in total.items()}
        return {layer: jnp.sqrt(t["sq_sum"] / t["count"]) for layer, t in total.items()}

    out = []
    for tree, scale, inputs in zip(trees, scales, stacked, strict=True):
        out.append(traverse_util.unflatten_dict(run(params, tree, np.float32(scale), inputs)))
    return out


def _stack(batches: Sequence[dict]) -> dict:
    """The batches stacked on a new leading axis, on device (UserError if their shapes differ)."""
    shapes = [jax.tree.map(np.shape, b) for b in batches]
    check(all(s == shapes[0] for s in shapes), "calibration batches differ in their shapes (expected equal batches).")
    return jax.device_put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches))


def cache_batches(cache_dir: str, schedule: DDPMSchedule, *, num_examples: int, batch_size: int,
                  seed: int, latents: str = "noised", category: str | None = None) -> list[dict]:
    """Calibration batches for `unet_apply` from a latent cache (scripts/prepare_data.py).

    Takes ceil(num_examples / batch_size) * batch_size harmful-prompt examples of all categories
    (or of `category`: one CoProV2 category, or several "A,B") in a permutation seeded by `seed`
    (cycling when the cache holds fewer), their harmful text states (S, D), and per batch b
    random t and eps from fold_in(key(seed), b). The cached harmful image latent x0 is drawn from
    its VAE moments (seeded by (seed, example)).
    """
    from safealign_jax.data.cache import CachedExamples, sample_latents

    check(latents in LATENTS, f"calibration latents {latents!r} are unknown (expected one of {list(LATENTS)}).")
    check(num_examples >= 1 and batch_size >= 1,
          f"calibration num_examples={num_examples} and batch_size={batch_size} must be >= 1.")
    examples = CachedExamples(cache_dir, category)
    check(len(examples) > 0, f"{cache_dir}: the latent cache holds no examples"
          f"{f' of category {category!r}' if category else ''}.")
    meta = examples.metadata
    order = np.random.default_rng(seed).permutation(len(examples))
    count = -(-num_examples // batch_size) * batch_size
    chosen = order[np.arange(count) % len(order)]
    key = jax.random.key(seed)
    batches = []
    for b in range(count // batch_size):
        rows = [examples[int(i)] for i in chosen[b * batch_size:(b + 1) * batch_size]]
        x0 = sample_latents(np.stack([r["rejected"] for r in rows]), meta["scaling_factor"],
                            meta["shift_factor"], [[seed, int(i)] for i in chosen[b * batch_size:(b + 1) * batch_size]])
        key_noise, key_t = jax.random.split(jax.random.fold_in(key, b))
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        t = jax.random.randint(key_t, (batch_size,), 0, schedule.num_train_timesteps)
        sample = add_noise(schedule, jnp.asarray(x0), noise, t) if latents == "noised" else noise
        batch = {"sample": sample, "timesteps": t,
                 "encoder_hidden_states": jnp.asarray(np.stack([r["encoder_hidden_states"] for r in rows]))}
        if meta["sdxl"]:
            size = float(meta["resolution"])
            batch["added_cond"] = {
                "text_embeds": jnp.asarray(np.stack([r["pooled"] for r in rows])),
                "time_ids": jnp.asarray(sdxl_time_ids(batch_size, size)),
            }
        batches.append(batch)
    return batches
