"""Runs the tiny training config and saves the final LoRA tree; used by tests/test_train_*.py,
in-process (`run`) or as a fresh python (`python tests/train_helper.py JOBS_JSON`) so a test can
choose the device count (XLA_FLAGS) or run several jax.distributed processes.

JOBS_JSON: a list of {"workdir": str, "out": str (.npz, written by process 0), "overrides":
{dotted: value}}, run in order; a job failing with a UserError writes {"error": message} to
out with suffix .json instead.
"""

import json
import sys
from pathlib import Path

import numpy as np

from safealign_jax.configs import train as train_configs

ROOT = Path(__file__).resolve().parents[1]


# Wall-clock speed of a log step in metrics.jsonl and every line's wall_time (Unix seconds): the
# only values two identical runs may differ in.
SPEED_FIELDS = ("pairs_per_s", "tflops_per_s", "mfu")


def without_speed(line: str) -> dict:
    """A metrics.jsonl line as a dict without the SPEED_FIELDS (present all together or not at all)
    and wall_time."""
    record = json.loads(line)
    assert all(k in record for k in SPEED_FIELDS) or not any(k in record for k in SPEED_FIELDS), record
    return {k: v for k, v in record.items() if k not in (*SPEED_FIELDS, "wall_time")}


def tiny_config(overrides: dict):
    config = train_configs.get_config("tiny")
    config.train.progress_bar = False
    config.update_from_flattened_dict(overrides)
    return config


def flat_arrays(tree) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def run(workdir: str, overrides: dict, out: str | None = None) -> tuple[dict, dict]:
    """Trains; returns (flat final LoRA arrays, summary) and saves them to `out` on process 0."""
    import jax

    from safealign_jax.train.loop import train

    state, summary = train(tiny_config(overrides), workdir)
    arrays = flat_arrays(state.trainable)
    if out and jax.process_index() == 0:
        np.savez(out, **arrays)
        Path(out).with_suffix(".json").write_text(json.dumps(summary))
    return arrays, summary


if __name__ == "__main__":
    from safealign_jax.errors import UserError

    for job in json.loads(sys.argv[1]):
        try:
            run(job["workdir"], job["overrides"], job["out"])
        except UserError as e:
            Path(job["out"]).with_suffix(".json").write_text(json.dumps({"error": str(e)}))
