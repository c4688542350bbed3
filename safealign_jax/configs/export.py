"""scripts/export.py: a trained LoRA (or PSA adapter) as files PyTorch users load unmodified.

    python scripts/export.py --config configs/export.py:peft --workdir OUT \
        --config.checkpoint=runs/sd15 [--config.model=/models/sd15]

Formats: peft (diffusers `load_lora_weights`), kohya (sd-scripts' keys and ss_* / modelspec.*
metadata; SDXL with the LDM block names ComfyUI and A1111 read), unet (the LoRA folded into the
base UNet: the whole pipeline folder, the base's other components copied or hard-linked, when the
run was trained on a pipeline; a diffusers unet/ folder with unet_only=True or a bare UNet base), ip-adapter
(the PSA adapter in diffusers' IP-Adapter layout), psalign (the PSA adapter in the official
PSAlign layout: user_proj.*, psa_adapter.<j>.to_{k,v}_user.0.weight; lambda in the metadata),
gated (a user-gated PSA run: one peft LoRA per category + psa_gate.safetensors,
`safealign_jax.convert.gated_files`).
"""

import ml_collections

FORMATS = ("peft", "kohya", "unet", "ip-adapter", "psalign", "gated")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.checkpoint = ""  # a training workdir, its checkpoints/ or one checkpoints/<step>/
    config.step = -1  # -1: the latest
    config.format = arg or "peft"
    config.model = ""  # the base model folder ("" = the one the run was trained on)
    config.fp16 = False  # write float16 tensors
    config.unet_only = False  # unet: write OUT/unet only, not the whole pipeline
    config.link = False  # unet: hard-link the base pipeline's other components instead of copying them
    config.title = ""  # kohya: modelspec.title ("" = the checkpoint folder's name)
    return config
