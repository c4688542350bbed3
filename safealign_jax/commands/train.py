"""`safealign-train` (scripts/train.py): Diffusion-DPO LoRA / PSA training. Resumes
automatically from `--workdir`.

    safealign-train --config train:sd15 --workdir runs/x --config.model.path=/models/sd15
    python scripts/train.py --config configs/train.py[:tiny|sd15|sd21|sdxl] --workdir runs/x ...

Prints the summary (JSON) of the run, or `run already finished at step N: WORKDIR`.
"""

import json

from safealign_jax import cli


def run(config, workdir: str) -> None:
    cli.status("importing JAX and the trainer ...")
    from safealign_jax.train.loop import train  # after the first line: imports JAX

    _, summary = train(config, workdir)
    if summary.get("already_finished"):
        print(f"run already finished at step {summary['finished_step']}: {workdir}")
    else:
        print(json.dumps(summary, indent=2))


def main() -> None:
    cli.main(run, announce=True)
