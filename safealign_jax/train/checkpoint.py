"""Orbax checkpoints of a training run in `workdir/checkpoints/<step>/`.

Each checkpoint holds: "state" (the TrainState: step, trainable tree, optimizer state, rng),
"config" (the run config as JSON), "data" (the batch source's position) and "base_model"
(path + cheap content hash of the frozen base weights). A workdir that already holds
checkpoints resumes from the latest; resuming on different base weights is refused.
"""

import hashlib
import json
import os
import warnings

import jax
import orbax.checkpoint as ocp

from safealign_jax.errors import UserError

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


class Checkpoints:
    """A CheckpointManager keeping the last `keep` checkpoints, saving asynchronously."""

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config: dict, data_state: dict, base_model: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                data=ocp.args.JsonSave(data_state),
                base_model=ocp.args.JsonSave(base_model),
            ),
        )

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


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with `shardings`, the restore target of `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
    meta = manager.restore(step, args=ocp.args.Composite(
        base_model=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
    ))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sharding read from the checkpoint: fine on one host
        state = ocp.PyTreeCheckpointer().restore(os.path.join(path, str(step), "state"))
    return {
        "step": step,
        "trainable": jax.device_get(state["trainable"]),
        "config": meta["config"],
        "base_model": meta["base_model"],
    }
