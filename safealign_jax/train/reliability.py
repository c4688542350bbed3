"""What keeps a training run exact across crashes, preemption and numerical blow-ups.

- `truncate_metrics`: on (re)start, metrics.jsonl keeps only the lines of steps the restored
  checkpoint covers (and drops a line cut short by a crash), so a resumed run neither repeats nor
  loses a step.
- `StopSignals`: SIGTERM / SIGINT set a flag; the loop saves a final checkpoint at the next step
  boundary and raises `Preempted` (scripts exit with status 128 + signal number). A second
  signal gets the default behaviour (immediate exit).
- `write_nonfinite`: the report `workdir/nonfinite_step_XXXXXX.json` of a step whose loss or
  gradient was not finite (the step itself never applies such an update).
"""

import json
import os
import signal
import threading

import jax
import numpy as np

from safealign_jax.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UserError):
    """Training stopped by a signal after saving a checkpoint; `exit_code` = 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoints: str):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}: checkpoint {checkpoints}/{step} saved; "
                         "rerun the same command to resume.")
        self.exit_code = 128 + signum


def truncate_metrics(path: str, step: int) -> None:
    """Keeps the lines of `path` (JSON objects with a "step") with step <= `step`, atomically."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is newer still
            if not line.endswith("\n") or record.get("step", step + 1) > step:
                break
            keep.append(line)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class StopSignals:
    """Catches SIGTERM / SIGINT into a flag between `install()` and `restore()` (main thread only)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up on the graceful stop
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum

    def requested(self) -> int | None:
        """The signal number if any process received one (agreed across processes), else None."""
        local = self.signum or 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = int(np.max(multihost_utils.process_allgather(np.int32(local))))
        return local or None


def batch_ids(source) -> list | None:
    """The ids of the batch `source` returned last (`source.last_ids()`), if it tells them."""
    ids = getattr(source, "last_ids", None)
    return list(ids()) if callable(ids) else None


def write_nonfinite(workdir: str, record: dict, ids: list | None, last_checkpoint: int | None) -> str:
    """Writes the report of a non-finite step (this process's batch rows); returns its path."""
    step = record["step"]
    suffix = "" if jax.process_index() == 0 else f".process_{jax.process_index()}"
    path = os.path.join(workdir, f"nonfinite_step_{step:06d}{suffix}.json")
    report = {"step": step, "loss": record.get("loss"), "grad_norm": record.get("grad_norm"),
              "batch_ids": ids, "process": jax.process_index(), "last_checkpoint": last_checkpoint}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return path
