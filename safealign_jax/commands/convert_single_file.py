"""`safealign-convert-single-file` (scripts/convert_single_file.py): converts a single-file
checkpoint (A1111 / civitai, LDM key layout) once into a diffusers pipeline folder in --workdir,
with diffusers' single-file loader (the torch extra), offline.

    safealign-convert-single-file --config convert_single_file --workdir models/mine \
        --config.checkpoint=mine.safetensors --config.base=stable-diffusion-v1-5/stable-diffusion-v1-5

Then pass the folder wherever a model is expected (`--config.model=models/mine`,
`--config.model.path=models/mine`).
"""

import json
import os

from safealign_jax import cli
from safealign_jax.convert.checkpoint import read_config
from safealign_jax.errors import UserError, check
from safealign_jax.models.resolve import resolve_model

SUFFIXES = (".safetensors", ".ckpt")
LDM_UNET_PREFIX = "model.diffusion_model."


def checkpoint_keys(path: str) -> list[str]:
    """The tensor names of a readable .safetensors file, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--config.checkpoint={path}: not a readable safetensors file ({e}).") from None


def pipeline_class(base: str):
    """The diffusers pipeline class named by `base`/model_index.json (single-file capable)."""
    import diffusers

    name = read_config(base, "model_index.json").get("_class_name", "")
    cls = getattr(diffusers, name, None)
    check(cls is not None and hasattr(cls, "from_single_file"),
          f"--config.base={base}: pipeline class {name!r} cannot load single files.")
    return cls


def run(config, workdir: str) -> None:
    path = config.checkpoint
    check(bool(path), "--config.checkpoint is empty: give the single-file checkpoint (.safetensors).")
    check(os.path.isfile(path), f"--config.checkpoint={path}: no such file.")
    check(path.lower().endswith(SUFFIXES), f"--config.checkpoint={path}: expected a {' or '.join(SUFFIXES)} file.")
    check(bool(config.base), "--config.base is empty: give the diffusers folder or cached hub id whose configs "
          "match the checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).")
    base = resolve_model(config.base, "--config.base")
    check(os.path.isfile(os.path.join(base, "model_index.json")),
          f"--config.base={config.base}: not a diffusers pipeline folder (no model_index.json).")
    check(not os.path.exists(os.path.join(workdir, "model_index.json")),
          f"--workdir={workdir}: already holds a pipeline; choose another folder.")
    if path.lower().endswith(".safetensors"):
        keys = checkpoint_keys(path)
        check(any(k.startswith(LDM_UNET_PREFIX) for k in keys),
              f"--config.checkpoint={path}: no {LDM_UNET_PREFIX}* tensors; not an A1111/LDM single-file checkpoint.")
    import torch

    cls = pipeline_class(base)
    dtype = torch.float16 if config.fp16 else torch.float32
    try:
        pipe = cls.from_single_file(path, config=base, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--config.checkpoint={path}: diffusers cannot convert it with the configs of "
                        f"{config.base} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    cli.output_folder(workdir)
    pipe.save_pretrained(workdir, safe_serialization=True)
    print(json.dumps({"pipeline": workdir, "class": cls.__name__, "base": base,
                      "dtype": "float16" if config.fp16 else "float32"}, indent=2))


def main() -> None:
    cli.main(run)
