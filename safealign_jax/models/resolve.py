"""Where a base model lives: a local diffusers folder, or a hub id (`ORG/NAME`) found offline in
the local Hugging Face cache. Single-file checkpoints (A1111 / civitai) are refused with the
command that converts them once (scripts/convert_single_file.py); nothing is ever downloaded.
"""

import os
import re

from safealign_jax.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time as
    huggingface_hub does: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_snapshot(repo_id: str, cache: str) -> str | None:
    """The local snapshot folder of model repo `repo_id` (its `refs/main`) in `cache`, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def resolve_model(spec: str, field: str = "model") -> str:
    """A local diffusers folder (pipeline or component) for `spec`.

    Args:
      spec: a folder; or a hub id `ORG/NAME` already in the local hub cache (`hub_cache()`).
      field: the config field `spec` came from, named in errors (e.g. "--config.model.path").
    Raises UserError naming the forms tried (folder, hub cache, single file) when none fits, and
    naming scripts/convert_single_file.py for a single-file checkpoint.
    """
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec) and spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise UserError(
            f"{field}={spec!r} is a single-file checkpoint: convert it once with python "
            f"scripts/convert_single_file.py --config configs/convert_single_file.py --workdir FOLDER "
            f"--config.checkpoint={spec} --config.base=BASE (a diffusers folder or cached hub id of its "
            "architecture) and pass FOLDER."
        )
    cache = hub_cache()
    snapshot = hub_snapshot(spec, cache) if HUB_ID.match(spec) else None
    if snapshot is not None:
        return snapshot
    hub = f"no hub id {spec!r} in the Hugging Face cache {cache}" if HUB_ID.match(spec) else "not a hub id ORG/NAME"
    single = "no such file" if spec.lower().endswith(SINGLE_FILE_SUFFIXES) else "not a .safetensors/.ckpt file"
    raise UserError(
        f"{field}={spec!r} not found: tried a local diffusers folder (no such folder), the hub cache ({hub}), "
        f"a single-file checkpoint ({single})."
    )
