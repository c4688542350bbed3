"""`safealign-train-experts` (scripts/train_experts.py): SafetyDPO safety experts, one LoRA per
category of the latent cache, trained one after the other.

    safealign-train-experts --config train:sd15 --workdir runs/experts \
        --config.model.path=/models/sd15 --config.data.source=cache --config.data.cache_dir=cache \
        [--config.experts.categories="Hate,Violence"] [--config.experts.all_single=True]

The categories are those of the cache (`metadata["category_index"]`: CoProV2's seven, or the free
text `category` values of your own pairs table), or the subset named by experts.categories (each
matched to the cache's spelling). Expert <category> is a normal training workdir
`workdir/experts/<slug>/` (e.g. experts/self_harm) trained by `safealign_jax.train.loop.train`
with --config.data.category=<category>; with experts.all_single the "all-single" baseline (one
LoRA on all categories) goes to `workdir/all_single/`, trained for as many steps as all the
experts together (experts x train.steps: a fair comparison at equal compute) unless
experts.all_single_steps > 0 sets them. Rerunning resumes: a finished run (its last checkpoint at
its steps) is skipped, an interrupted one resumes from its checkpoints. Merge the experts with
`safealign-merge --config.experts=workdir/experts`.
"""

import json
import os

from safealign_jax import cli
from safealign_jax.data.categories import select, slug
from safealign_jax.errors import check


def cache_categories(config) -> list[str]:
    """The categories of config.data.cache_dir's latent cache, in its index order."""
    from safealign_jax.data.cache import open_cache  # imports JAX

    check(config.data.source == "cache",
          f"--config.data.source={config.data.source}: experts are trained per category of a latent cache "
          "(synthetic pairs have none); use --config.data.source=cache (from scripts/prepare_data.py).")
    check(bool(config.data.cache_dir),
          "--config.data.cache_dir is empty: experts are trained per category of a latent cache; give "
          "the folder written by scripts/prepare_data.py.")
    names = list(open_cache(config.data.cache_dir)[0]["category_index"])
    check(bool(names), f"--config.data.cache_dir={config.data.cache_dir}: the cache has no categories "
          "(a pairs table needs a `category` column for experts).")
    return names


def jobs(config, categories: list[str]) -> list[tuple[str, str, int]]:
    """[(relative workdir, category ("" = all), steps)] in training order: one expert per name of
    experts.categories (matched among `categories`, the data set's own) or per category."""
    names = [c.strip() for c in config.experts.categories.split(",") if c.strip()]
    chosen = [select(c, categories, "--config.experts.categories") for c in names] or list(categories)
    out = [(os.path.join("experts", slug(c)), c, config.train.steps) for c in dict.fromkeys(chosen)]
    if config.experts.all_single:
        check(config.experts.all_single_steps >= 0,
              f"--config.experts.all_single_steps={config.experts.all_single_steps} is invalid "
              f"(expected an integer >= 0; 0 = experts x train.steps).")
        steps = config.experts.all_single_steps or len(out) * config.train.steps
        out.append(("all_single", "", steps))
    return out


def finished(workdir: str, steps: int) -> bool:
    """Whether `workdir` holds a checkpoint at step >= `steps`."""
    import orbax.checkpoint as ocp

    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return False
    with ocp.CheckpointManager(folder) as manager:
        latest = manager.latest_step()
    return latest is not None and latest >= steps


def run(config, workdir: str) -> None:
    planned = jobs(config, cache_categories(config))
    from safealign_jax.train.loop import train

    results = {}
    for name, category, steps in planned:
        run_dir = os.path.join(workdir, name)
        if finished(run_dir, steps):
            print(f"{name}: finished, skipped")
            results[name] = "skipped (finished)"
            continue
        print(f"{name}: training on {category or 'all categories'} for {steps} steps")
        run_config = config.copy_and_resolve_references()
        run_config.data.category = category
        run_config.train.steps = steps
        _, summary = train(run_config, run_dir)
        results[name] = summary.get("final", {})
    print(json.dumps(results, indent=2))


def main() -> None:
    cli.main(run, announce=True)
