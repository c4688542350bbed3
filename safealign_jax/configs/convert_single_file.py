"""scripts/convert_single_file.py: an A1111 / civitai single-file checkpoint -> a diffusers folder.

    python scripts/convert_single_file.py --config configs/convert_single_file.py --workdir models/mine \
        --config.checkpoint=mine.safetensors --config.base=stable-diffusion-v1-5/stable-diffusion-v1-5

`base` gives the architecture's configs (model_index.json, unet/vae/text encoder configs,
tokenizer, scheduler): a diffusers folder, or a hub id already in the local Hugging Face cache
(SDXL: stabilityai/stable-diffusion-xl-base-1.0). Nothing is downloaded.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # the single-file checkpoint (.safetensors; .ckpt is a pickle, read with weights_only)
    c.base = ""  # a diffusers folder or cached hub id with the configs matching the checkpoint
    c.fp16 = False  # store the converted weights in float16
    return c
