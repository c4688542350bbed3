"""scripts/embed_users.py: one LLM embedding per PSA user profile.

    python scripts/embed_users.py --config configs/embed_users.py --workdir embeddings \
        --config.model=/path/to/Qwen2.5-7B-Instruct [--config.users=1-100]
"""

import ml_collections

SAGE_USERS = "../shared/data/sage/users"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # a local causal-LM folder (paper: Qwen2.5-7B-Instruct) with a chat template
    config.users_csv = f"{SAGE_USERS}/users.csv"
    config.template = f"{SAGE_USERS}/embedding_prompt_template.txt"
    config.users = "all"  # 'all', or ids and ranges: '1-100,205'
    config.batch_size = 8
    config.dtype = "float32"  # or bfloat16 (the official run used the checkpoint's bf16)
    config.device = ""  # '' : cuda when available, else cpu
    return config
