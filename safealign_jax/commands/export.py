"""Exports a training checkpoint for PyTorch users (see configs/export.py for the formats).

    python scripts/export.py --config configs/export.py:FORMAT --workdir OUT --config.checkpoint=RUN

Loading the results in diffusers:
    pipe.load_lora_weights("OUT/lora.safetensors")                     # peft or kohya
    StableDiffusionPipeline.from_pretrained("OUT")                     # unet: the whole pipeline
    UNet2DConditionModel.from_pretrained("OUT/unet")                   # unet with unet_only=True
    pipe.load_ip_adapter("OUT", subfolder="", weight_name="psa_adapter.safetensors",
                         image_encoder_folder=None)                    # ip-adapter
    PSAAdapter(pipe, psa_adapter_ckpt="OUT/psa_adapter.safetensors", ...)   # psalign (PSAlign's code)
The adapter scale lambda is in both adapter files' metadata ("psa_scale").
    pipe.load_lora_weights("OUT", weight_name=f"{c}.safetensors", adapter_name=c)   # gated, per
    pipe.set_adapters(cats, adapter_weights=gates)     # category c (README "User-gated PSA")

Installed as `safealign-export` (scripts/export.py in the checkout).
"""

import json
import os

import numpy as np

from safealign_jax import cli
from safealign_jax.convert.adapter_files import save_ip_adapter, save_psalign_adapter
from safealign_jax.convert.checkpoint import read_config
from safealign_jax.convert.gated_files import save_gated
from safealign_jax.convert.lora_files import save_kohya_lora, save_peft_lora
from safealign_jax.convert.unet_files import save_pipeline_folder, save_unet_folder
from safealign_jax.errors import check
from safealign_jax.models import load_unet
from safealign_jax.models.load import component_folder
from safealign_jax.models.resolve import resolve_model
from safealign_jax.runs import pipeline_folder
from safealign_jax.trained import load_trained

FORMATS = ("peft", "kohya", "unet", "ip-adapter", "psalign", "gated")


def base_folder(config, base_model: dict) -> str:
    if config.model:
        return resolve_model(config.model, "--config.model")
    folder = base_model["path"]
    check(
        os.path.isdir(folder),
        f"the base model {folder!r} is not a folder: pass the diffusers folder the run was trained on as --config.model.",
    )
    return folder


def prediction_type(folder: str) -> str:
    """The base pipeline scheduler's prediction_type ("epsilon" without a scheduler/ config)."""
    pipeline = pipeline_folder(folder)
    if pipeline is None or not os.path.isfile(os.path.join(pipeline, "scheduler", "scheduler_config.json")):
        return "epsilon"
    return read_config(os.path.join(pipeline, "scheduler"), "scheduler_config.json").get("prediction_type", "epsilon")


def run(config, workdir):
    check(config.format in FORMATS, f"--config.format={config.format!r} is unknown (expected one of {', '.join(FORMATS)}).")
    check(bool(config.checkpoint), "--config.checkpoint is empty: give the training workdir.")
    run = load_trained(config.checkpoint, None if config.step < 0 else config.step)
    check(config.format == "gated" or run.gated is None,
          f"{config.checkpoint}: a user-gated PSA run exports only as 'gated' (--config.format=gated).")
    check(config.format != "gated" or run.gated is not None,
          f"{config.checkpoint}: the checkpoint holds no user-gated PSA tree, so it cannot be exported as 'gated'.")
    if config.format in ("ip-adapter", "psalign"):
        check(run.adapter is not None, f"{config.checkpoint}: the checkpoint holds no PSA adapter, so it cannot be exported as {config.format!r}.")
    elif config.format in ("peft", "kohya"):
        check(run.lora is not None,
              f"{config.checkpoint}: the checkpoint holds {'a full-rank delta' if run.delta is not None else 'no LoRA'}, "
              f"which cannot be exported as {config.format!r} (use format 'unet', or merge with an SVD rank).")
    elif config.format == "unet":
        check(run.lora is not None or run.delta is not None,
              f"{config.checkpoint}: the checkpoint holds no LoRA or delta to fold into a UNet.")
    cli.output_folder(workdir)
    dtype = np.float16 if config.fp16 else np.float32
    if config.format == "gated":
        summary = save_gated(workdir, run.gated, list(run.categories), dtype=dtype, hard=run.hard_gates)
    elif config.format in ("peft", "kohya"):
        rank, alpha = run.trainable.lora_rank_alpha()
        path = os.path.join(workdir, "lora.safetensors")
        if config.format == "peft":
            summary = save_peft_lora(path, run.lora, rank, alpha, dtype=dtype)
        else:  # the base's architecture names the keys (SDXL: LDM blocks) and the metadata
            folder = base_folder(config, run.base_model)
            title = config.title or os.path.basename(os.path.normpath(config.checkpoint))
            summary = save_kohya_lora(path, run.lora, rank, alpha, unet_config=read_config(component_folder(folder, "unet")),
                                      title=title, prediction_type=prediction_type(folder), dtype=dtype)
    else:
        folder = base_folder(config, run.base_model)
        _, params = load_unet(folder)
        if config.format in ("ip-adapter", "psalign"):
            save = save_ip_adapter if config.format == "ip-adapter" else save_psalign_adapter
            summary = save(os.path.join(workdir, "psa_adapter.safetensors"), run.adapter, params, dtype=dtype,
                           scale=run.adapter_scale)
        else:
            folded = run.folded(params)
            pipeline = pipeline_folder(folder)  # the run's unet/ folder -> the pipeline around it
            if pipeline and not config.unet_only:
                summary = save_pipeline_folder(pipeline, workdir, folded, fp16=config.fp16, link=config.link)
            else:
                unet_dir = component_folder(folder, "unet")
                summary = save_unet_folder(os.path.join(workdir, "unet"), read_config(unet_dir), folded, fp16=config.fp16)
    print(json.dumps({"checkpoint_step": run.step, **summary}, indent=2, default=str))


def main() -> None:
    cli.main(run)
