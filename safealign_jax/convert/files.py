"""Atomic writes (readable by others, as the umask allows) and guarded reads of safetensors files
shared by the exporters, images, embeddings and reports (numpy only)."""

import contextlib
import os
import tempfile

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from safealign_jax.errors import UserError, check


def new_file_mode() -> int:
    """The mode open() gives a new file under the process umask: 0o644 for umask 022, 0o640 for 027."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing the umask
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path next to `path`; on success it replaces `path` (os.replace) with the
    mode of a newly created file (`new_file_mode`, not mkstemp's 0600), so other users can read it."""
    folder = os.path.dirname(os.path.abspath(path))
    check(os.path.isdir(folder), f"{path}: the folder {folder} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Writes `tensors` (contiguous numpy arrays) with string `metadata` to `path` atomically."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_tensors(path: str, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32-or-native numpy arrays, safetensors metadata) of a weights file.

    A PyTorch pickle (.bin / .pt / .pth / .ckpt) is read only with `allow_pickle=True`, then with
    `torch.load(weights_only=True)` (torch imported here only).
    """
    check(os.path.isfile(path), f"{path}: no such file.")
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        check(
            allow_pickle,
            f"{path}: is a PyTorch pickle; pass allow_pickle=True to read it (only for files you trust), "
            "or convert it to safetensors.",
        )
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure means a bad user file
            raise UserError(f"{path}: not a readable PyTorch weights file ({e}).") from None
        check(isinstance(state, dict), f"{path}: expected a dict of tensors.")
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}, {}
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}).") from None
    return tensors, metadata


def summarise(names, limit: int = 5) -> str:
    """'a, b, c and 4 more'."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str], noun: str) -> list[str]:
    """One phrase per kind of mismatch between a file's keys and the expected ones, e.g.
    "2 missing tensor(s): a, b"; empty when the file matches."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing {noun}(s): {summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {noun}(s): {summarise(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {summarise(mismatched, 3)}")
    return problems
