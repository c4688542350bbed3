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

Installed as `safealign-merge` (scripts/merge.py in the checkout).
"""

import json
import os
import time

from safealign_jax import cli, merge
from safealign_jax.errors import check
from safealign_jax.models.resolve import resolve_model
from safealign_jax.runs import save_trained
from safealign_jax.trainable import Trainable

FORMS = ("delta", "svd")


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


def run(config, workdir):
    check(config.output.form in FORMS, f"--config.output.form={config.output.form!r} is unknown (expected one of {FORMS}).")
    check(not os.path.isdir(os.path.join(workdir, "checkpoints", "0")),
          f"{workdir}: already holds a checkpoint 0; choose another workdir.")
    cli.output_folder(workdir)
    paths = merge.expert_paths(config.experts)
    names, trained = merge.load_experts(paths)
    merge.check_settings(config.method, config)
    start, base, timings = time.perf_counter(), None, {}
    if config.method in merge.RUN_BASE:
        base = merge.load_base(trained, config.model and resolve_model(config.model, "--config.model"))
        timings["base_model_s"] = time.perf_counter() - start
    merged = merge.merge_experts(config.method, merge.Experts.of(names, trained), config, base)
    timings.update(merged.timings_s)
    run_config = {"merge": config.to_dict(), "experts": dict(zip(names, map(os.path.abspath, paths), strict=True)),
                  "model": trained[0].config.get("model", {})}
    errors = {}
    if config.output.form == "svd":
        start = time.perf_counter()
        tree, errors = merge.to_lora(merged.delta, config.output.rank)
        timings["svd_s"] = time.perf_counter() - start
        trainable = Trainable({"lora": tree})
    else:
        trainable = Trainable({"delta": merged.delta})
    folder = save_trained(workdir, trainable, run_config, trained[0].base_model)
    summary = merge.summarize(config, names, merged, errors, timings, folder)
    with open(os.path.join(workdir, "merge_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)


def main() -> None:
    cli.main(run)
