"""scripts/sample.py: text-to-image generation from a prompt file.

    python scripts/sample.py --config configs/sample.py --workdir out \
        --config.model=/path/to/pipeline --config.prompts=../shared/data/eval_prompts/ud_1434.csv
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # a diffusers pipeline folder
    config.prompts = ""  # a .txt file (one prompt per line) or a .csv with a prompt/caption column
    config.limit = 0  # generate for the first `limit` prompts only (0: all)
    config.negative_prompt = ""
    config.seed = 0  # image i gets seed `seed + i` unless the file has a seed column (I2P sd_seed)
    config.use_file_seeds = True
    config.steps = 50
    config.sampler = "ddim"
    config.guidance = 7.5
    config.guidance_rescale = 0.0
    config.height = 0  # 0: the model's native size
    config.width = 0
    config.batch_size = 4
    config.dtype = "float32"  # or bfloat16
    config.contact_sheet_max = 64  # images on the contact sheet
    return config
