"""Reading safetensors checkpoints in the diffusers / transformers folder layouts, with numpy only.

Supported in one folder, in this order of preference:
  <name>[.<variant>].safetensors                         one file
  <name>[.<variant>].safetensors.index.json              sharded, with its "weight_map"
where `name` is e.g. "diffusion_pytorch_model" (diffusers) or "model" (transformers).
"""

import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from safealign_jax.errors import UserError, check


def _load_one(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}).") from None


def find_weights(folder: str, name: str, variant: str | None = None) -> str:
    """Returns the path of the weights file (or shard index) for `name` in `folder`."""
    check(os.path.isdir(folder), f"{folder}: no such model folder.")
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        base = f"{name}.{v}" if v else name
        for candidate in (f"{base}.safetensors", f"{base}.safetensors.index.json"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    wanted = f"{name}{'.' + variant if variant else ''}.safetensors"
    pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    hint = f" (found only pickle files {pickles}: convert them to safetensors)" if pickles else ""
    raise UserError(f"{folder}: no {wanted} or sharded {wanted}.index.json{hint}.")


def read_state_dict(folder: str, name: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads all tensors of the checkpoint `name` in `folder` into a {torch name: array} dict.

    fp16 / bf16 tensors keep their dtype here; callers cast to the parameter dtype.
    """
    path = find_weights(folder, name, variant)
    if not path.endswith(".index.json"):
        return _load_one(path)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a valid shard index with a 'weight_map' ({e}).") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        check(os.path.isfile(shard_path), f"{path}: names shard {shard}, which is missing.")
        tensors.update(_load_one(shard_path))
    absent = sorted(set(weight_map) - set(tensors))
    check(not absent, f"{path}: tensors listed in the index but absent from the shards: {absent[:5]}.")
    return tensors


def read_config(folder: str, filename: str = "config.json") -> dict:
    """Reads a JSON config, with one clear error when it is missing or malformed."""
    path = os.path.join(folder, filename)
    check(os.path.isfile(path), f"{folder}: no {filename} (is this a diffusers model folder?).")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from None
    check(isinstance(config, dict), f"{path}: expected a JSON object.")
    return config
