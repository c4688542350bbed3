"""A (folded) UNet params tree -> a diffusers `unet/` folder or a whole pipeline folder.

Writes go to a temporary sibling folder that is renamed into place, so a crash never leaves a
half-written folder. Weights: unet/diffusion_pytorch_model[.fp16].safetensors named through
`DIFFUSERS_NAMES`; config.json is the base model's.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from safealign_jax.convert.checkpoint import read_config
from safealign_jax.convert.files import write_safetensors
from safealign_jax.convert.names import DIFFUSERS_NAMES, state_dict_from_params
from safealign_jax.errors import check


def _replace_folder(tmp: str, folder: str) -> None:
    """Moves the finished `tmp` folder to `folder`, replacing an existing one."""
    if os.path.isdir(folder):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(folder))
        os.rmdir(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


@contextlib.contextmanager
def _replacing(folder: str, prefix: str) -> Iterator[str]:
    """Yields a fresh temporary path beside the absolute `folder` to write the new folder at; it
    replaces `folder` when the block ends without an error and is removed in any case."""
    parent = os.path.dirname(folder)
    check(os.path.isdir(parent), f"{folder}: the parent folder {parent} does not exist.")
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.rmdir(tmp)
        yield tmp
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_unet(folder: str, config: dict, params: dict, fp16: bool) -> None:
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    dtype = np.float16 if fp16 else np.float32
    tensors = {k: v.astype(dtype) for k, v in state_dict_from_params(params, DIFFUSERS_NAMES).items()}
    name = "diffusion_pytorch_model" + (".fp16" if fp16 else "") + ".safetensors"
    write_safetensors(os.path.join(folder, name), tensors, {"format": "pt"})


def save_unet_folder(folder: str, unet_config: dict, params: dict, fp16: bool = False) -> dict:
    """Writes `params` as a diffusers UNet folder (`UNet2DConditionModel.from_pretrained(folder)`).

    Args:
      folder: the output folder (replaced if it exists).
      unet_config: the base UNet's config.json as a dict (e.g. `read_config(base/unet)`).
      params: the UNet params tree (e.g. `lora.fold(params, tree, scale)`).
      fp16: write diffusion_pytorch_model.fp16.safetensors in float16 (load with variant="fp16").
    Returns {"path", "tensors", "dtype"}.
    """
    folder = os.path.abspath(folder)
    with _replacing(folder, ".tmp-unet-") as tmp:
        _write_unet(tmp, unet_config, params, fp16)
    return {"path": folder, "tensors": len(state_dict_from_params(params, DIFFUSERS_NAMES)),
            "dtype": "float16" if fp16 else "float32"}


def _link_or_copy(source: str, target: str) -> None:
    """A hard link of `source` at `target`, or a copy where links are impossible (other device)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_pipeline_folder(base_pipeline_folder: str, out_folder: str, params: dict, fp16: bool = False,
                         link: bool = False) -> dict:
    """Copies the base pipeline (model_index.json and every component but unet/) and writes
    `params` as its unet/. `link`: hard-link the base's files instead of copying them (no extra
    disk; falls back to a copy across devices).

    Load with `DiffusionPipeline.from_pretrained(out_folder)` (ComfyUI: its diffusers loader).
    Returns {"path", "dtype", "components"} (the components taken from the base).
    """
    check(os.path.isfile(os.path.join(base_pipeline_folder, "model_index.json")),
          f"{base_pipeline_folder}: not a diffusers pipeline folder (no model_index.json).")
    config = read_config(os.path.join(base_pipeline_folder, "unet"))
    out_folder = os.path.abspath(out_folder)
    with _replacing(out_folder, ".tmp-pipeline-") as tmp:
        shutil.copytree(base_pipeline_folder, tmp, ignore=shutil.ignore_patterns("unet"),
                        copy_function=_link_or_copy if link else shutil.copy2)
        _write_unet(os.path.join(tmp, "unet"), config, params, fp16)
        components = sorted(e.name for e in os.scandir(tmp) if e.is_dir() and e.name != "unet")
    return {"path": out_folder, "dtype": "float16" if fp16 else "float32", "components": components}
