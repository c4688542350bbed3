"""One merge of safety experts into one delta tree: the method dispatch behind scripts/merge.py
and the synthetic demo.

    names, trained = load_experts(expert_paths(config.experts))
    experts = Experts.of(names, trained)
    base = load_base(trained, config.model)          # or Base(module, params, schedule, folder)
    merged = merge_experts(config.method, experts, config, base)
    merged.delta, merged.wins, merged.delta_norm, merged.timings_s

`config` has the shape of configs/merge.py (method fields, comerge.*, calibration.*, fusion_*).
Co-Merge calibrates on `calibration.cache_dir` (one batch list for all experts, or each expert's
own training category); fusion fits the text-keyed layers to each expert's concepts (read from
`fusion_concepts` with the base pipeline's text encoder, or given as `FusionStates`) and merges
the other layers by `fusion_rest`.
"""

import dataclasses
import time
from collections.abc import Sequence

import jax
from flax import traverse_util

from safealign_jax.errors import UserError, check
from safealign_jax.merge.calibration import cache_batches, calibrate, unet_apply
from safealign_jax.merge.comerge import comerge
from safealign_jax.merge.fusion import combine, fuse, read_concepts
from safealign_jax.merge.methods import dare, linear, task_arithmetic, ties
from safealign_jax.merge.trees import delta_norm
from safealign_jax.schedulers import DDPMSchedule

METHODS = ("comerge", "linear", "task_arithmetic", "ties", "dare", "fusion")
STATISTICS_FROM = ("all", "own_category")
FUSION_REST = ("linear", "comerge")
RUN_BASE = ("comerge", "fusion")  # the methods that run the base model (the others are tree arithmetic)


@dataclasses.dataclass(frozen=True)
class Experts:
    """The experts of one merge: LoRA (or delta) trees with equal paths, their scales alpha / r,
    and the category each was trained on (None: all categories)."""

    names: tuple[str, ...]
    trees: tuple[dict, ...]
    scales: tuple[float, ...]
    categories: tuple[str | None, ...]

    @classmethod
    def of(cls, names: Sequence[str], trained: Sequence) -> "Experts":
        """From `Trained` runs (`load_experts`); the category is the run's data.category."""
        return cls(tuple(names), tuple(t.lora for t in trained), tuple(t.lora_scale for t in trained),
                   tuple(t.config.get("data", {}).get("category") or None for t in trained))

    def first(self, k: int) -> "Experts":
        return Experts(self.names[:k], self.trees[:k], self.scales[:k], self.categories[:k])


@dataclasses.dataclass(frozen=True)
class Base:
    """The frozen base the experts adapt: UNet module and params, its DDPM schedule (calibration
    noise) and its pipeline folder (fusion reads concept phrases with its text encoder; None: none)."""

    module: object
    params: dict
    schedule: DDPMSchedule
    folder: str | None = None


@dataclasses.dataclass(frozen=True)
class FusionStates:
    """Text states for fusion: per expert its concepts' (N_i, S, D), and the preserved (M, S, D) or None."""

    concepts: list
    preserved: object = None


@dataclasses.dataclass(frozen=True)
class Merged:
    """A merge's delta tree {P: {"delta": (in, out)}}, Co-Merge's weights won per expert per layer
    {layer: [count per expert]} ({} without selection), its calibration statistics (reusable by a
    later merge of the same experts and calibration; None without) and timings in seconds."""

    delta: dict
    wins: dict
    statistics: list | None
    timings_s: dict

    @property
    def delta_norm(self) -> float:
        return delta_norm(self.delta)


def load_base(trained: Sequence, model: str = "") -> Base:
    """The base UNet the experts were trained on (their run config), or the folder `model`
    (UserError unless it is that model)."""
    import ml_collections

    from safealign_jax.runs import pipeline_folder
    from safealign_jax.train import model as train_model
    from safealign_jax.train.objective import training_schedule

    config = ml_collections.ConfigDict(trained[0].config)
    if model:
        config.model.path = model
    module, params, reference = train_model.load_base(config)
    if reference["sha256"] != trained[0].base_model["sha256"]:
        raise UserError(f"the base model {reference['path']!r} is not the one the experts were trained on "
                        f"({trained[0].base_model['path']!r}); pass that folder as --config.model.")
    schedule = training_schedule(config.model.path, config.model.prediction_type)
    return Base(module, params, schedule, pipeline_folder(config.model.path))


def check_settings(method: str, config, text_states: "FusionStates | None" = None) -> None:
    """UserError naming the first field of `config` that `method` cannot run with (before any
    model is loaded); fusion given its `text_states` needs no fusion_concepts."""
    check(method in METHODS, f"--config.method={method!r} is unknown (expected one of {', '.join(METHODS)}).")
    if method == "fusion":
        check(text_states is not None or bool(config.fusion_concepts), "--config.fusion_concepts is empty: fusion needs a CSV expert,phrase.")
        check(config.fusion_rest in FUSION_REST,
              f"--config.fusion_rest={config.fusion_rest!r} is unknown (expected one of {FUSION_REST}).")
    if method == "comerge" or (method == "fusion" and config.fusion_rest == "comerge"):
        check(bool(config.calibration.cache_dir),
              "--config.calibration.cache_dir is empty: comerge needs a latent cache (scripts/prepare_data.py).")
        check(config.statistics_from in STATISTICS_FROM,
              f"--config.statistics_from={config.statistics_from!r} is unknown (expected one of {STATISTICS_FROM}).")


def merge_experts(method: str, experts: Experts, config, base: Base | None, *, statistics: list | None = None,
                  text_states: FusionStates | None = None) -> Merged:
    """The merge of `experts` by `method` (one of METHODS) with the settings of `config`
    (configs/merge.py's shape); `base`: None for methods outside RUN_BASE; `statistics`: Merged.statistics of an earlier Co-Merge of these
    experts with this calibration (skips calibrating); `text_states`: fusion's states (default:
    read from config.fusion_concepts / fusion_preserve with the base's text encoder)."""
    check_settings(method, config, text_states)
    check(base is not None or method not in RUN_BASE, f"{method} runs the base model: pass its Base.")
    timings = {}
    if method == "comerge":
        return _comerge(experts, config, base, statistics, timings)
    if method == "fusion":
        return _fusion(experts, config, base, statistics, text_states, timings)
    trees, scales, start = experts.trees, experts.scales, time.perf_counter()
    if method == "linear":
        delta = linear(trees, scales, weights(config, len(trees)), experts.names)
    elif method == "task_arithmetic":
        delta = task_arithmetic(trees, scales, config.lam, experts.names)
    elif method == "ties":
        delta = ties(trees, scales, config.density, config.lam, experts.names)
    else:
        delta = dare(trees, scales, key=jax.random.key(config.seed), drop=config.drop,
                     weights=weights(config, len(trees)), names=experts.names)
    delta = jax.block_until_ready(delta)
    timings["merge_s"] = time.perf_counter() - start
    return Merged(delta, {}, None, timings)


def weights(config, count: int) -> list[float] | None:
    """config.weights ("w1,w2,...", one per expert) as floats; None when empty (equal weights)."""
    if not config.weights:
        return None
    try:
        values = [float(w) for w in config.weights.split(",")]
    except ValueError as e:
        raise UserError(f"--config.weights={config.weights!r} is invalid (expected comma-separated numbers).") from e
    check(len(values) == count, f"--config.weights has {len(values)} values for {count} experts.")
    return values


def _comerge(experts: Experts, config, base: Base, statistics, timings: dict) -> Merged:
    if statistics is None:
        statistics = _calibrate(experts, config, base, timings)
    start = time.perf_counter()
    delta, wins = comerge(experts.trees, experts.scales, statistics, config.comerge.granularity, experts.names)
    timings["selection_s"] = time.perf_counter() - start
    return Merged(jax.block_until_ready(delta), wins, statistics, timings)


def _calibrate(experts: Experts, config, base: Base, timings: dict) -> list[dict]:
    cal = config.calibration
    start = time.perf_counter()

    def batches_of(category):
        return cache_batches(cal.cache_dir, base.schedule, num_examples=cal.num_examples, batch_size=cal.batch_size,
                             seed=cal.seed, latents=cal.latents, category=category)

    if config.statistics_from == "own_category":  # an expert of all categories (None) sees them all
        batches = [batches_of(category) for category in experts.categories]
    else:
        batches = batches_of(None)
    timings["calibration_data_s"] = time.perf_counter() - start
    start = time.perf_counter()
    statistics = jax.block_until_ready(calibrate(unet_apply(base.module), base.params, experts.trees, experts.scales,
                                                 batches, config.comerge.statistic))
    timings["calibration_s"] = time.perf_counter() - start
    return statistics


def _fusion(experts: Experts, config, base: Base, statistics, text_states, timings: dict) -> Merged:
    """Least-squares fusion of the text-keyed layers (`fuse`) + `fusion_rest` for the others."""
    if text_states is None:
        text_states = fusion_states(experts, config, base, timings)
    start = time.perf_counter()
    fused = fuse(base.params, experts.trees, text_states.concepts, text_states.preserved,
                 preserve_weight=config.fusion_preserve_weight, ridge=config.fusion_ridge, scales=experts.scales,
                 names=experts.names)
    timings["fusion_s"] = time.perf_counter() - start
    if config.fusion_rest == "comerge":
        rest = _comerge(experts, config, base, statistics, timings)
    else:
        rest = Merged(linear(experts.trees, experts.scales, weights(config, len(experts.trees)), experts.names),
                      {}, None, timings)
    keyed = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(fused)}
    wins = {layer: w for layer, w in rest.wins.items() if layer not in keyed}
    return Merged(combine(fused, rest.delta), wins, rest.statistics, timings)


def fusion_states(experts: Experts, config, base: Base, timings: dict | None = None) -> FusionStates:
    """Each expert's concept phrases (config.fusion_concepts, CSV expert,phrase) and the preserved
    phrases (config.fusion_preserve) encoded by the base pipeline's text encoder."""
    from safealign_jax import erase
    from safealign_jax.eval.generation import read_prompts
    from safealign_jax.pipeline import load_pipeline

    concepts = read_concepts(config.fusion_concepts, list(experts.names))
    preserved = [row.prompt for row in read_prompts(config.fusion_preserve)] if config.fusion_preserve else []
    check(base.folder is not None, "the base model is not in a pipeline folder (fusion needs its text encoder): "
          "pass the pipeline folder as --config.model.")
    start = time.perf_counter()
    pipe = load_pipeline(base.folder, unet=(base.module, base.params))
    states = FusionStates([erase.preserved_states(pipe, phrases) for phrases in concepts],
                          erase.preserved_states(pipe, preserved) if preserved else None)
    if timings is not None:
        timings["text_states_s"] = time.perf_counter() - start
    return states
