"""The one owner of run folders: save, restore, read and hash.

A run folder (a training workdir, or a merge / edit result) holds Orbax checkpoints in
`workdir/checkpoints/<step>/`, each with: "state" (step, the trainable tree and, for training,
optimizer state and rng), "config" (the run config as JSON; a merge or edit records its
trainable's kind and scales there, `trainable.record`), "base_model" (path + cheap content hash
of the frozen base weights) and, for training, "data" (the batch source's position).
`Checkpoints` is the trainer's manager (resume, keep the last k, asynchronous saves); `save_trained`
writes a merge's or edit's result in the same layout; `read_trainable` reads either.

A workdir that already holds checkpoints resumes from the latest readable one; resuming on
different base weights is refused.

Crash safety: Orbax writes a checkpoint into a temporary folder and renames it when complete, so
a run killed mid-save leaves no `<step>/` folder (the temporary one is removed on the next start).
A complete checkpoint that was damaged later (truncated or deleted files) is reported on stderr
in one line, moved to `workdir/damaged_checkpoints/`, and the previous one is used; when
checkpoints exist but none is readable, resuming fails with a UserError (never a fresh start).
"""


import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from safealign_jax.errors import UserError
from safealign_jax.trainable import Trainable, record, scales_of

_HEAD_BYTES = 1 << 20
# Config fields that shape the saved state: a resumed run must keep them.
STATE_FIELDS = (("lora", "rank"), ("lora", "alpha"), ("optim", "name"), ("optim", "grad_accum"),
                ("optim", "clip_norm"))


def hash_folder(folder: str) -> str:
    """sha256 over the folder's JSON configs and, per weight file, its name, size and first MiB."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            digest.update(rel.encode())
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    digest.update(f.read())
            elif name.endswith((".safetensors", ".bin", ".msgpack")):
                digest.update(str(os.path.getsize(path)).encode())
                with open(path, "rb") as f:
                    digest.update(f.read(_HEAD_BYTES))
    return digest.hexdigest()


def hash_json(value) -> str:
    """sha256 of a JSON-serialisable description (for in-process models)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def folder_holding(model_path: str, relative: str) -> str | None:
    """`model_path` or its parent (a pipeline around a unet/ folder), whichever holds the file
    `relative`; None when neither (or `model_path` is empty)."""
    for folder in (model_path, os.path.dirname(os.path.normpath(model_path))) if model_path else ():
        if os.path.isfile(os.path.join(folder, relative)):
            return folder
    return None


def pipeline_folder(model_path: str) -> str | None:
    """The diffusers pipeline folder holding `model_path` (itself or the parent of its unet/), or None."""
    return folder_holding(model_path, "model_index.json")


def _checkpoint_args(state, config: dict, base_model: dict, data: dict | None = None) -> ocp.args.Composite:
    """The items of one checkpoint: state, config and base model, and the data position of training."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config),
             "base_model": ocp.args.JsonSave(base_model)}
    if data is not None:
        items["data"] = ocp.args.JsonSave(data)
    return ocp.args.Composite(**items)


class Checkpoints:
    """A CheckpointManager keeping the last `keep` checkpoints, saving asynchronously."""

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest_good(self, abstract_state, base_model: dict, config: dict):
        """(state, data_state, step) of the newest readable checkpoint, or None without any.

        Newer checkpoints that fail to read are reported (one stderr line each) and moved to
        `workdir/damaged_checkpoints/`. Raises UserError when checkpoints exist but none is
        readable, or when the run's config / base model differ from the checkpoint's.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        stray = sorted(int(n) for n in _listdir(self.directory) if n.isdigit() and int(n) not in steps)
        for step in stray:  # a <step>/ folder Orbax does not list: its metadata files are gone
            self._set_aside(step, "incomplete (Orbax metadata missing)")
        damaged = []
        for step in steps:
            try:
                with _without_late_read_noise():
                    state, data_state = self.restore(abstract_state, base_model, config, step)
            except UserError:
                raise
            except Exception as e:  # any read failure: a damaged checkpoint
                damaged.append(step)
                self._set_aside(step, _first_line(e))
                continue
            if damaged or stray:
                self.manager.reload()
            return state, data_state, step
        if damaged or stray:
            raise UserError(
                f"{self.directory}: checkpoint(s) {sorted(damaged + stray)} exist but none is readable "
                f"(moved to {self._damaged_dir()}); refusing to start afresh: delete the workdir or "
                "use a new --workdir to start a new run."
            )
        return None

    def _damaged_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")

    def _set_aside(self, step: int, reason: str) -> None:
        """Reports checkpoint `step` as damaged and moves it out of the manager's folder."""
        target = os.path.join(self._damaged_dir(), f"{step}-{int(time.time())}")
        print(f"warning: checkpoint {self.directory}/{step} is damaged ({reason}); moved to {target}, "
              "using the previous one.", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            os.makedirs(self._damaged_dir(), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        _sync(f"set_aside_{step}")

    def save(self, step: int, state, config: dict, data_state: dict, base_model: dict) -> None:
        self.manager.save(step, args=_checkpoint_args(state, config, base_model, data=data_state))

    def restore(self, abstract_state, base_model: dict, config: dict, step: int | None = None):
        """(state, data_state) of checkpoint `step` (default latest). Refuses other base weights,
        and a `config` changing a field of STATE_FIELDS."""
        step = self.latest_step() if step is None else step
        meta = self.manager.restore(step, args=ocp.args.Composite(
            base_model=ocp.args.JsonRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
        ))
        for section, field in STATE_FIELDS:
            old, new = meta["config"][section][field], config[section][field]
            if old != new:
                raise UserError(
                    f"{self.directory}/{step}: this run was trained with --config.{section}.{field}="
                    f"{old!r}, not {new!r}; keep it to resume, or use a new --workdir."
                )
        saved = meta["base_model"]
        if saved["sha256"] != base_model["sha256"]:
            raise UserError(
                f"{self.directory}/{step}: this run was trained on base model {saved['path']!r} "
                f"(sha256 {saved['sha256'][:12]}), but this run's base model is {base_model['path']!r} "
                f"(sha256 {base_model['sha256'][:12]}); use a new --workdir or the original weights."
            )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"], meta["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


_LATE_READ_NOISE = ("Traceback (most recent call last):", "asyncio/base_events.py", "self._check_closed()",
                    "raise RuntimeError('Event loop is closed')", "RuntimeError: Event loop is closed")


@contextlib.contextmanager
def _without_late_read_noise(grace_s: float = 0.5):
    """Runs a restore with file descriptor 2 captured. After a failed restore, tensorstore reads
    still in flight complete into Orbax's closed asyncio loop and print `RuntimeError: Event loop
    is closed` tracebacks from native threads; those lines are dropped (the failure itself is
    reported in one line by the caller), anything else written meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                time.sleep(grace_s)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = [x for x in lines if x.strip() and not any(n in x for n in _LATE_READ_NOISE)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with `shardings`, the restore target of `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _as_numpy(state_folder: str) -> ocp.args.PyTreeRestore:
    """Restore args reading the PyTree saved in `state_folder` as host numpy arrays.

    No sharding from the checkpoint is used, so a state saved on any number of devices (or
    processes) reads on any other, e.g. an 8-device training run on a 1-device machine.
    """
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_folder)).tree
    return ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved))


def read_trainable(path: str, step: int | None = None) -> dict:
    """The trainable tree of a finished or running training, for export / sampling / merging.

    Args:
      path: a training workdir, its `checkpoints/` folder, or one `checkpoints/<step>/` folder.
      step: which checkpoint (default: the latest, or the one `path` names).
    Returns:
      {"step", "trainable" (numpy tree), "config" (dict), "base_model" ({"path", "sha256"})}.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        path, step = os.path.dirname(path), int(os.path.basename(path))
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such training workdir or checkpoint folder.")
    manager = ocp.CheckpointManager(path)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise UserError(f"{path}: no checkpoint {'' if step is None else step} (found steps {list(manager.all_steps())}).")
    try:
        with _without_late_read_noise():
            restored = manager.restore(step, args=ocp.args.Composite(
                base_model=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
                state=_as_numpy(os.path.join(path, str(step), "state")),
            ))
    except Exception as e:  # any read failure: a damaged checkpoint
        raise UserError(f"{path}/{step}: the checkpoint is damaged or incomplete ({_first_line(e)}); "
                        "pass an earlier one with --config.step.") from None
    return {
        "step": step,
        "trainable": restored["state"]["trainable"],
        "config": restored["config"],
        "base_model": restored["base_model"],
    }


def save_trained(workdir: str, trainable: Trainable | dict, config: dict, base_model: dict, step: int = 0) -> str:
    """Writes a merge's or edit's `trainable` as `workdir/checkpoints/<step>/` in the layout of a
    training checkpoint, so every script that accepts a training run accepts it. Returns the
    checkpoint folder.

    `trainable`: a `Trainable`, or a trainable dict whose scales `config` gives (`scales_of`); its
    kind and scales are recorded in the saved config's "trainable" section (`record`).
    Raises UserError if that checkpoint already exists (a merge never overwrites a result).
    """
    if not isinstance(trainable, Trainable):
        trainable = Trainable(trainable, scales_of(config))
    trainable.validate(workdir)
    config = {**config, "trainable": record(trainable)}
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(os.path.join(folder, str(step))):
        raise UserError(f"{workdir}: already holds a checkpoint {step}; choose another workdir.")
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(trainable.tree))
    with ocp.CheckpointManager(folder) as manager:
        manager.save(step, args=_checkpoint_args({"step": np.int32(step), "trainable": tree}, config, base_model))
        manager.wait_until_finished()
    return os.path.join(folder, str(step))
