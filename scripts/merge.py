"""Merges safety experts (LoRA checkpoints) into one model; see configs/merge.py.

    python scripts/merge.py --config configs/merge.py:comerge --workdir runs/merged \
        --config.experts=runs/experts/experts --config.calibration.cache_dir=cache/coprov2 \
        [--config.statistics_from=own_category]
    python scripts/merge.py --config configs/merge.py:fusion --workdir runs/fused \
        --config.experts=runs/experts/experts --config.fusion_concepts=concepts.csv \
        [--config.fusion_preserve=keep.txt] [--config.fusion_rest=comerge ...]

Writes workdir/checkpoints/0 (a {"delta"} or, with output.form=svd, a {"lora"} checkpoint that
scripts/export.py and scripts/sample.py accept like a trained LoRA) and workdir/merge_summary.json
(per layer: |dW|, weights won by each expert (comerge), SVD relative reconstruction error; the
merged delta's total Frobenius norm; timings).
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from safealign_jax import cli, merge
from safealign_jax.errors import UserError, check
from safealign_jax.trained import save_trained

CONFIG = cli.define_flags()
FORMS = ("delta", "svd")
STATISTICS_FROM = ("all", "own_category")
FUSION_REST = ("linear", "comerge")


def _weights(config, count: int) -> list[float] | None:
    if not config.weights:
        return None
    try:
        weights = [float(w) for w in config.weights.split(",")]
    except ValueError as e:
        raise UserError(f"--config.weights={config.weights!r} is invalid (expected comma-separated numbers).") from e
    check(len(weights) == count, f"--config.weights has {len(weights)} values for {count} experts.")
    return weights


def _base(config, experts, timings) -> tuple:
    """(base config, UNet module, params) of the experts' base model (--config.model overrides its
    folder; UserError if that is not the model they were trained on)."""
    from safealign_jax.train.model import load_base

    base_config = ml_collections.ConfigDict(experts[0].config)
    if config.model:
        base_config.model.path = config.model
    start = time.perf_counter()
    module, params, reference = load_base(base_config)
    if reference["sha256"] != experts[0].base_model["sha256"]:
        raise UserError(f"the base model {reference['path']!r} is not the one the experts were trained on "
                        f"({experts[0].base_model['path']!r}); pass that folder as --config.model.")
    timings["base_model_s"] = time.perf_counter() - start
    return base_config, module, params


def _comerge(config, names, experts, timings, base=None) -> tuple[dict, dict]:
    from safealign_jax.train.objective import training_schedule

    check(bool(config.calibration.cache_dir),
          "--config.calibration.cache_dir is empty: comerge needs a latent cache (scripts/prepare_data.py).")
    check(config.statistics_from in STATISTICS_FROM,
          f"--config.statistics_from={config.statistics_from!r} is unknown (expected one of {STATISTICS_FROM}).")
    base_config, module, params = base or _base(config, experts, timings)
    start = time.perf_counter()
    schedule = training_schedule(base_config.model.path, base_config.model.prediction_type)
    cal = config.calibration

    def batches_of(category):
        return merge.cache_batches(cal.cache_dir, schedule, num_examples=cal.num_examples, batch_size=cal.batch_size,
                                   seed=cal.seed, latents=cal.latents, category=category)

    if config.statistics_from == "own_category":  # an expert of all categories ("") sees them all
        batches = [batches_of(e.config.get("data", {}).get("category") or None) for e in experts]
    else:
        batches = batches_of(None)
    timings["calibration_data_s"] = time.perf_counter() - start
    trees, scales = [e.lora for e in experts], [e.lora_scale for e in experts]
    start = time.perf_counter()
    statistics = jax.block_until_ready(merge.calibrate(merge.unet_apply(module), params, trees, scales,
                                                       batches, config.comerge.statistic))
    timings["calibration_s"] = time.perf_counter() - start
    start = time.perf_counter()
    delta, wins = merge.comerge(trees, scales, statistics, config.comerge.granularity, names)
    jax.block_until_ready(delta)
    timings["selection_s"] = time.perf_counter() - start
    return delta, wins


def _fusion(config, names, experts, timings) -> tuple[dict, dict]:
    """Least-squares fusion of the text-keyed layers (merge.fuse) + `fusion_rest` for the others."""
    from safealign_jax import erase
    from safealign_jax.eval.generation import read_prompts
    from safealign_jax.pipeline import load_pipeline
    from safealign_jax.train.samples import pipeline_folder

    check(bool(config.fusion_concepts), "--config.fusion_concepts is empty: fusion needs a CSV expert,phrase.")
    check(config.fusion_rest in FUSION_REST,
          f"--config.fusion_rest={config.fusion_rest!r} is unknown (expected one of {FUSION_REST}).")
    concepts = merge.read_concepts(config.fusion_concepts, names)
    preserved = [row.prompt for row in read_prompts(config.fusion_preserve)] if config.fusion_preserve else []
    base = _base(config, experts, timings)
    folder = pipeline_folder(base[0].model.path)
    check(folder is not None, f"the base model {base[0].model.path!r} is not in a pipeline folder (fusion needs its "
          "text encoder): pass the pipeline folder as --config.model.")
    start = time.perf_counter()
    pipe = load_pipeline(folder, unet=base[1:])
    states = [erase.preserved_states(pipe, phrases) for phrases in concepts]
    kept = erase.preserved_states(pipe, preserved) if preserved else None
    timings["text_states_s"] = time.perf_counter() - start
    trees, scales = [e.lora for e in experts], [e.lora_scale for e in experts]
    start = time.perf_counter()
    fused = merge.fuse(base[2], trees, states, kept, preserve_weight=config.fusion_preserve_weight,
                       ridge=config.fusion_ridge, scales=scales, names=names)
    timings["fusion_s"] = time.perf_counter() - start
    if config.fusion_rest == "comerge":
        rest, wins = _comerge(config, names, experts, timings, base)
    else:
        rest, wins = merge.linear(trees, scales, _weights(config, len(trees)), names), {}
    keyed = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(fused)}
    return merge.combine(fused, rest), {layer: w for layer, w in wins.items() if layer not in keyed}


def merged_delta(config, names, experts, timings) -> tuple[dict, dict]:
    """(delta tree, wins per layer ({} for methods without selection)) of `config.method`."""
    if config.method == "comerge":
        return _comerge(config, names, experts, timings)
    if config.method == "fusion":
        return _fusion(config, names, experts, timings)
    trees, scales = [e.lora for e in experts], [e.lora_scale for e in experts]
    start = time.perf_counter()
    if config.method == "linear":
        delta = merge.linear(trees, scales, _weights(config, len(trees)), names)
    elif config.method == "task_arithmetic":
        delta = merge.task_arithmetic(trees, scales, config.lam, names)
    elif config.method == "ties":
        delta = merge.ties(trees, scales, config.density, config.lam, names)
    elif config.method == "dare":
        delta = merge.dare(trees, scales, key=jax.random.key(config.seed), drop=config.drop,
                           weights=_weights(config, len(trees)), names=names)
    else:
        raise UserError(f"--config.method={config.method!r} is unknown (expected one of comerge, linear, "
                        "task_arithmetic, ties, dare, fusion).")
    timings["merge_s"] = time.perf_counter() - start
    return jax.block_until_ready(delta), {}


def summarize(config, names, delta, wins, errors, timings, folder) -> dict:
    """merge_summary.json: per layer the merged delta's Frobenius norm, the weights each expert
    won (comerge) and the SVD relative reconstruction error (form svd); totals; timings."""
    norms = {"/".join(path[:-1]): float(np.linalg.norm(np.asarray(value)))
             for path, value in traverse_util.flatten_dict(delta).items()}
    summary = {
        "method": config.method, "experts": names, "checkpoint": folder, "form": config.output.form,
        "delta_norm": merge.delta_norm(delta), "timings_s": timings,
        "layers": {layer: {"delta_norm": norm,
                           **({"wins": dict(zip(names, wins[layer], strict=True))} if layer in wins else {}),
                           **({"relative_error": errors[layer]} if layer in errors else {})}
                   for layer, norm in sorted(norms.items())},
    }
    if wins:
        summary["total_wins"] = {n: sum(w[i] for w in wins.values()) for i, n in enumerate(names)}
    if errors:
        summary["max_relative_error"] = max(errors.values())
    return summary


def print_summary(summary: dict) -> None:
    names = summary["experts"]
    width = max(len(n) for n in names)
    print(f"merged {len(names)} experts with {summary['method']} -> {summary['checkpoint']}")
    for layer, entry in summary["layers"].items():
        parts = [f"|dW| {entry['delta_norm']:.3e}"]
        if "wins" in entry:
            total = sum(entry["wins"].values())
            parts.append(" ".join(f"{n:>{width}} {100 * w / total:5.1f}%" for n, w in entry["wins"].items()))
        if "relative_error" in entry:
            parts.append(f"svd rel.err {entry['relative_error']:.2e}")
        print(f"  {layer}: {' | '.join(parts)}")
    for key in ("delta_norm", "total_wins", "max_relative_error", "timings_s"):
        if key in summary:
            print(f"{key}: {json.dumps(summary[key])}")


def main(config, workdir):
    check(config.output.form in FORMS, f"--config.output.form={config.output.form!r} is unknown (expected one of {FORMS}).")
    check(not os.path.isdir(os.path.join(workdir, "checkpoints", "0")),
          f"{workdir}: already holds a checkpoint 0; choose another workdir.")
    cli.output_folder(workdir)
    paths = merge.expert_paths(config.experts)
    names, experts = merge.load_experts(paths)
    timings = {}
    delta, wins = merged_delta(config, names, experts, timings)
    run_config = {"merge": config.to_dict(), "experts": dict(zip(names, map(os.path.abspath, paths), strict=True)),
                  "model": experts[0].config.get("model", {})}
    errors = {}
    if config.output.form == "svd":
        start = time.perf_counter()
        tree, errors = merge.to_lora(delta, config.output.rank)
        timings["svd_s"] = time.perf_counter() - start
        trainable = {"lora": tree}
        run_config["lora"] = {"rank": config.output.rank, "alpha": float(config.output.rank)}
    else:
        trainable = {"delta": delta}
    folder = save_trained(workdir, trainable, run_config, experts[0].base_model)
    summary = summarize(config, names, delta, wins, errors, timings, folder)
    with open(os.path.join(workdir, "merge_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)


if __name__ == "__main__":
    cli.run(main, CONFIG)
