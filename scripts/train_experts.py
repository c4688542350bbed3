"""SafetyDPO safety experts: one LoRA per CoProV2 category, trained one after the other.

    python scripts/train_experts.py --config configs/train.py:sd15 --workdir runs/experts \
        --config.model.path=/models/sd15 --config.data.source=cache --config.data.cache_dir=cache \
        [--config.experts.categories="Hate,Violence"] [--config.experts.all_single=True]

Expert <category> is a normal training workdir `workdir/experts/<slug>/` (e.g. experts/self_harm)
trained by `safealign_jax.train.loop.train` with --config.data.category=<category>; with
experts.all_single the "all-single" baseline (one LoRA on all categories) goes to
`workdir/all_single/`, trained for as many steps as all the experts together (experts x
train.steps: a fair comparison at equal compute) unless experts.all_single_steps > 0 sets them.
Rerunning resumes: a finished run (its last checkpoint at its steps) is skipped, an interrupted
one resumes from its checkpoints. Merge the experts with scripts/merge.py
--config.experts=workdir/experts.
"""

import json
import os

import orbax.checkpoint as ocp

from safealign_jax import cli
from safealign_jax.data.categories import COPROV2, slug
from safealign_jax.errors import check
from safealign_jax.train.loop import train

CONFIG = cli.define_flags()


def jobs(config) -> list[tuple[str, str, int]]:
    """[(relative workdir, category ("" = all), steps)] in training order."""
    names = [c.strip() for c in config.experts.categories.split(",") if c.strip()]
    categories = [COPROV2.require(c, "--config.experts.categories") for c in names] or list(COPROV2.categories)
    out = [(os.path.join("experts", slug(c)), c, config.train.steps) for c in dict.fromkeys(categories)]
    if config.experts.all_single:
        check(config.experts.all_single_steps >= 0,
              f"--config.experts.all_single_steps={config.experts.all_single_steps} is invalid "
              f"(expected an integer >= 0; 0 = experts x train.steps).")
        steps = config.experts.all_single_steps or len(out) * config.train.steps
        out.append(("all_single", "", steps))
    return out


def finished(workdir: str, steps: int) -> bool:
    """Whether `workdir` holds a checkpoint at step >= `steps`."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return False
    with ocp.CheckpointManager(folder) as manager:
        latest = manager.latest_step()
    return latest is not None and latest >= steps


def main(config, workdir):
    check(config.data.source != "synthetic",
          "--config.data.source=synthetic draws random pairs with no categories, so all experts would be "
          "the same; use --config.data.source=cache (a latent cache from scripts/prepare_data.py).")
    results = {}
    for name, category, steps in jobs(config):
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


if __name__ == "__main__":
    cli.run(main, CONFIG)
