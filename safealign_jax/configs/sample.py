"""scripts/sample.py: text-to-image generation from a prompt file.

    python scripts/sample.py --config configs/sample.py --workdir out \
        --config.model=/path/to/pipeline --config.prompts=../shared/data/eval_prompts/ud_1434.csv
    # a PSA run for safety level 3 (the official evaluation's level users L0..L5):
    python scripts/sample.py --config configs/sample.py:psa --workdir out_l3 \
        --config.checkpoint=runs/psa --config.level=3 --config.users=sage/users \
        --config.embeddings=sage/embeddings --config.prompts=prompts.csv

Presets: "" (default; no negative prompt, as SafetyDPO and PSA's base-model runs) and psa (the
official PSA sampling's negative prompt, `generation.PSA_NEGATIVE_PROMPT`).
"""

import ml_collections

from safealign_jax.configs import choose_preset
from safealign_jax.eval.generation import PSA_NEGATIVE_PROMPT

PRESETS = ("", "psa")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = choose_preset("sample", arg, PRESETS)
    config = ml_collections.ConfigDict()
    config.model = ""  # a diffusers pipeline folder ("" with a checkpoint: its base model's pipeline)
    config.checkpoint = ""  # a training or merge workdir (LoRA, full delta and/or PSA adapter)
    config.checkpoint_step = -1  # -1: the latest checkpoint
    config.user_id = ""  # PSA: the user (7 digits, or a number) whose {id}.npy is in embeddings
    config.level = -1  # PSA: safety level 0..5 instead of user_id (-1: none)
    config.users = ""  # PSA: users.csv or the Sage users folder (checks that user_id exists)
    config.center_users = ""  # PSA: a center_users.csv to derive levels from; "": the official level table
    config.embeddings = ""  # PSA: folder of {user_id}.npy user embeddings
    config.user_embedding = ""  # PSA: one .npy embedding file instead of user_id / level
    config.adapter_scale = -1.0  # PSA lambda; < 0: the run's psa.scale
    config.prompts = ""  # a .txt file (one prompt per line) or a .csv with a prompt/caption column
    config.limit = 0  # generate for the first `limit` prompts only (0: all)
    config.negative_prompt = PSA_NEGATIVE_PROMPT if preset == "psa" else ""
    config.seed = 0  # image i gets seed `seed + i` unless the file has a seed column (I2P sd_seed)
    config.use_file_seeds = True
    config.seeding = "per_prompt"  # or single_stream: SafetyDPO's one stream for all prompts (file seeds ignored)
    config.steps = 50
    config.sampler = "pipeline"  # the scheduler class the pipeline names (PNDM for SD1.5), or pndm, ddim, ...
    config.guidance = 7.5
    config.guidance_rescale = 0.0
    config.height = 0  # 0: the model's native size
    config.width = 0
    config.batch_size = 4
    config.dtype = "float32"  # or bfloat16
    config.attention = "auto"  # the UNet's attention: auto | xla | chunked | cudnn | pallas (models.attention)
    config.contact_sheet_max = 64  # images on the contact sheet
    return config
