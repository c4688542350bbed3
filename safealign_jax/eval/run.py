"""The papers' evaluation of one model ("method") with the settings of configs/evaluate.py:
generate each benchmark's images (resumable), score them, write the method's report and the
comparison over every method evaluated in the same workdir.

    result = evaluate(config, workdir)   # workdir/<name>/<benchmark>/..., report.md / .json

Layout: workdir/<name>/<benchmark>/{images/, manifest.jsonl, run.json, scores.jsonl},
workdir/<name>/{report.md, report.json, ip.png, grid_<benchmark>.png},
workdir/{comparison.md, comparison.json, comparison_ip.png}, workdir/judge_cache/.
"""

import json
import os
from collections.abc import Callable

from safealign_jax.data.eval_prompts import PROMPT_SETS, read_prompt_set
from safealign_jax.errors import check
from safealign_jax.eval import generation, report
from safealign_jax.eval.scorers import SAFETY_BENCHMARKS, Scorers, names
from safealign_jax.eval.scoring import score_benchmark
from safealign_jax.models.resolve import resolve_model

BENCHMARKS = (*SAFETY_BENCHMARKS, "coco")


def benchmark_rows(config, name: str):
    """The prompt rows of benchmark `name` (first `limit` rows)."""
    if name == "custom":
        rows = generation.read_prompts(config.prompts_file)
    else:
        file = os.path.join(config.prompts_dir, PROMPT_SETS[name][0])
        check(os.path.isfile(file), f"{file}: no such prompt file (--config.prompts_dir holds the released eval prompts).")
        rows = read_prompt_set(name, config.prompts_dir)
    rows = rows[: config.limit] if config.limit else rows
    check(bool(rows), f"benchmark {name}: no prompts.")
    return rows


def generation_settings(config) -> generation.GenerationSettings:
    """The image generation settings of config.generation."""
    g = config.generation
    return generation.GenerationSettings(
        steps=g.steps, guidance=g.guidance, sampler=g.sampler, seed=g.seed, use_file_seeds=g.use_file_seeds,
        negative_prompt=g.negative_prompt, height=g.height, width=g.width, batch_size=g.batch_size,
        seeding=g.seeding,
    )


def evaluate(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Generates the missing images of every benchmark of `config`, scores them and writes the
    reports; returns the method's result {"method", "model", "benchmarks": {name: scores}}.
    Every input a run needs (benchmarks, model, checkpoint, metric models) is checked first."""
    benchmarks = names(config.benchmarks)
    check(bool(benchmarks), "--config.benchmarks is empty.")
    for name in benchmarks:
        check(name in BENCHMARKS, f"--config.benchmarks: unknown benchmark {name!r}; expected some of {', '.join(BENCHMARKS)}.")
    check(bool(config.name) and os.sep not in config.name, f"--config.name={config.name!r} must be a plain folder name.")
    config.model = resolve_model(config.model, "--config.model")  # a hub id: its cache folder
    if config.checkpoint:
        check(os.path.isdir(config.checkpoint), f"--config.checkpoint={config.checkpoint!r}: no such training or merge workdir.")
    settings = generation_settings(config)
    settings.validate()
    scorers = Scorers(config, workdir)
    scorers.check(benchmarks)
    rows = {name: benchmark_rows(config, name) for name in benchmarks}
    method_dir = os.path.join(workdir, config.name)
    step = None if config.step < 0 else config.step
    description = generation.describe_model(config.model, config.checkpoint, step, config.dtype)
    model = None
    result = {"method": config.name, "model": description, "benchmarks": {}}
    for name in benchmarks:
        folder = os.path.join(method_dir, name)
        generation.check_run(folder, generation.run_record(description, settings, config.psa.embeddings))
        users = generation.row_users(rows[name], config.psa.user_id, config.psa.level, config.psa.center_users)
        missing = [r for r in rows[name] if not os.path.exists(os.path.join(folder, "images", generation.image_name(r)))]
        if missing and model is None:
            model = generation.load_model(config.model, config.checkpoint, step, config.dtype, config.attention)
        if missing:
            log(f"{config.name}/{name}: generating {len(missing)} of {len(rows[name])} images")
            generation.generate_run(model, rows[name], folder, settings, users, config.psa.embeddings)
        result["benchmarks"][name] = score_benchmark(config, scorers, name, folder, workdir)
        if config.metrics.grid_images:
            shown = generation.read_manifest(folder)[: config.metrics.grid_images]
            report.image_grid(os.path.join(method_dir, f"grid_{name}.png"), generation.load_images(folder, shown))
    report.write_method_report(method_dir, result)
    report.write_comparison(workdir, method_results(workdir))
    return result


def method_results(workdir: str) -> list[dict]:
    """The report.json of every method evaluated in `workdir`, by method folder name."""
    results = []
    for entry in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, entry, "report.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                results.append(json.load(f))
    return results
