"""scripts/export.py: a trained LoRA (or PSA adapter) as files PyTorch users load unmodified.

    python scripts/export.py --config configs/export.py:peft --workdir OUT \
        --config.checkpoint=runs/sd15 [--config.model=/models/sd15]

Formats: peft (diffusers `load_lora_weights`), kohya, unet (the LoRA folded into the base UNet:
a diffusers unet/ folder, or a whole pipeline folder when the base is a pipeline), ip-adapter
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
    return config
