"""Closed-form concept editing of the cross-attention key / value layers; see configs/erase.py.

    python scripts/erase.py --config configs/erase.py --workdir runs/erase \
        --config.model=/models/sd15 --config.edits=edits.csv [--config.preserve=keep.txt]

Writes workdir/checkpoints/0 (a {"delta"} or, with output.form=svd, a {"lora"} run that
scripts/sample.py, export.py and evaluate.py accept) and workdir/erase_summary.json; prints the
norm of every edited layer's delta, the total, the fit of the text-state map (`erase.edit_fit`:
a residual near 1 means the edit cannot move these concepts while keeping the preserved
phrases; fewer concepts or a lower preserve weight help) and the summary as one JSON line.

Installed as `safealign-erase` (scripts/erase.py in the checkout).
"""

import json
import os
import time

import ml_collections
from flax.traverse_util import flatten_dict

from safealign_jax import cli, erase, merge
from safealign_jax.errors import check
from safealign_jax.models.resolve import resolve_model
from safealign_jax.runs import save_trained
from safealign_jax.trainable import Trainable

FORMS = ("delta", "svd")


def load_model(config):
    """(pipeline, UNet base reference {"path", "sha256"}) of --config.model."""
    from safealign_jax.pipeline import load_pipeline
    from safealign_jax.train.model import load_base

    check(bool(config.model), "--config.model is empty: give a diffusers pipeline folder.")
    config.model = resolve_model(config.model, "--config.model")  # a hub id: its cache folder
    base = ml_collections.ConfigDict({"seed": 0, "model": {"path": config.model, "variant": config.variant,
                                                           "compute_dtype": "float32", "remat_policy": "none"}})
    module, params, reference = load_base(base)
    return load_pipeline(config.model, variant=config.variant or None, unet=(module, params)), reference


def run(config, workdir):
    check(config.output.form in FORMS, f"--config.output.form={config.output.form!r} is unknown (expected one of {FORMS}).")
    check(bool(config.edits), "--config.edits is empty: give a CSV with columns source,target.")
    check(not os.path.isdir(os.path.join(workdir, "checkpoints", "0")),
          f"{workdir}: already holds a checkpoint 0; choose another workdir.")
    edits = erase.read_edits(config.edits)
    if config.preserve:
        from safealign_jax.eval.generation import read_prompts

        preserved = [row.prompt for row in read_prompts(config.preserve)]
        check(bool(preserved), f"{config.preserve}: no phrases to preserve.")
    else:
        preserved = []
    timings = {}
    start = time.perf_counter()
    pipe, base_model = load_model(config)
    timings["model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = erase.rows_from_prompts(pipe, edits, preserved)
    solve = {"preserve_weight": config.preserve_weight, "ridge": config.ridge}
    text_map = erase.edit_map(*rows, **solve)
    delta, fit = erase.map_delta(pipe.unet_params, text_map, config.layers), erase.edit_fit(*rows, text_map)
    timings["solve_s"] = time.perf_counter() - start
    cli.output_folder(workdir)
    run_config = {"erase": config.to_dict(), "model": {"path": os.path.abspath(config.model), "variant": config.variant}}
    errors = {}
    if config.output.form == "svd":
        tree, errors = merge.to_lora(delta, config.output.rank)
        trainable = Trainable({"lora": tree})
    else:
        trainable = Trainable({"delta": delta})
    folder = save_trained(workdir, trainable, run_config, base_model)
    layers = {"/".join(path[:-1]): erase.delta_norm(value) for path, value in sorted(flatten_dict(delta).items())}
    summary = {"checkpoint": folder, "form": config.output.form, "edits": len(edits), "preserved": len(preserved),
               "preserve_weight": config.preserve_weight, "ridge": config.ridge, "delta_norm": erase.delta_norm(delta),
               "fit": fit, "layers": layers, "timings_s": timings}
    if errors:
        summary["max_relative_error"] = max(errors.values())
    with open(os.path.join(workdir, "erase_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"edited {len(layers)} layers for {len(edits)} edits ({len(preserved)} preserved phrases) -> {folder}")
    for name, norm in layers.items():
        print(f"  {name}: |dW| {norm:.3e}" + (f" | svd rel.err {errors[name]:.2e}" if name in errors else ""))
    print(f"total |dW| {summary['delta_norm']:.3e}")
    print(f"fit of the text-state map (relative): residual {fit['residual']:.3f} (0: every source lands on its target)"
          + (f", preserved states moved {fit['preserved_change']:.3f}" if "preserved_change" in fit else ""))
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}))


def main() -> None:
    cli.main(run)
