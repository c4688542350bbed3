"""Finding and loading the expert checkpoints of a merge.

    paths = expert_paths("runs/experts")            # every subfolder holding checkpoints/
    paths = expert_paths("runs/hate,runs/violence")  # or an explicit comma-separated list
    names, experts = load_experts(paths)            # Trained per expert, checked mergeable
"""

import os

from safealign_jax.errors import UserError, check
from safealign_jax.merge.trees import check_compatible, check_same_base
from safealign_jax.trained import Trained, load_trained


def _is_run(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "checkpoints"))


def expert_paths(spec: str) -> list[str]:
    """The expert workdirs named by `spec`: a comma-separated list of workdirs / checkpoint
    folders, or one folder that is not itself a run, meaning all its subfolders that are runs
    (sorted by name)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    check(bool(parts), "no experts given: name the expert workdirs (comma-separated) or their parent folder.")
    if len(parts) == 1 and os.path.isdir(parts[0]) and not _is_run(parts[0]) \
            and not os.path.isdir(os.path.join(parts[0], "state")):
        folder = parts[0]
        runs = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if _is_run(os.path.join(folder, n))]
        check(bool(runs), f"{folder}: holds no expert workdirs (subfolders with checkpoints/).")
        return runs
    return parts


def expert_name(path: str) -> str:
    """A readable name: the workdir's folder name (the category for scripts/train_experts.py)."""
    path = os.path.normpath(os.path.abspath(path))
    while os.path.basename(path) in ("checkpoints",) or os.path.basename(path).isdigit():
        path = os.path.dirname(path)
    return os.path.basename(path)


def load_experts(paths: list[str]) -> tuple[list[str], list[Trained]]:
    """(names, Trained per expert) of the LoRA experts at `paths` (latest checkpoints).

    Raises UserError if a checkpoint holds no LoRA, or the experts were trained on different base
    models, or adapt different layers / shapes (naming the first mismatch).
    """
    names = [expert_name(p) for p in paths]
    if len(set(names)) != len(names):
        names = [os.path.normpath(p) for p in paths]
    experts = [load_trained(p) for p in paths]
    for name, expert in zip(names, experts, strict=True):
        if expert.lora is None:
            raise UserError(f"expert {name}: its checkpoint holds no LoRA to merge (a merge result or a PSA adapter?).")
    check_same_base([e.base_model for e in experts], names)
    check_compatible([e.lora for e in experts], names)
    return names, experts
