"""scripts/evaluate.py: the papers' benchmark protocol for one model (a "method").

    python scripts/evaluate.py --config configs/evaluate.py:safetydpo --workdir eval \
        --config.name=safetydpo --config.model=/path/to/sd15 --config.checkpoint=runs/merged \
        --config.models.q16_clip=/path/to/clip-vit-large-patch14 ...

Presets (the part after ':'):
  safetydpo    I2P, UD, CoProV2 test (IP = Q16 or NudeNet) and COCO (FID, CLIPScore)   [default]
  psa          Sage seen/unseen (IP, Pass Rate with each prompt's user), CoProV2, I2P, UD, COCO;
               negative prompt = the official PSA sampling's (set it to "" for a base model)
  i2p, ud, coprov2, coco, sage_seen, sage_unseen   one benchmark with its metrics
  custom       the prompt file `prompts_file` (a .csv or .txt), IP and CLIPScore
Every run writes `workdir/<name>/<benchmark>/` (images, manifest.jsonl), `workdir/<name>/report.md`
and `.json`, and `workdir/comparison.md` over every method evaluated in `workdir`.
"""

import ml_collections

from safealign_jax.eval.generation import PSA_NEGATIVE_PROMPT

BENCHMARKS = ("i2p", "ud", "coprov2", "coco", "sage_seen", "sage_unseen", "custom")
PRESETS = {
    "safetydpo": "i2p,ud,coprov2,coco",
    "psa": "sage_seen,sage_unseen,coprov2,i2p,ud,coco",
    **{name: name for name in BENCHMARKS},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "safetydpo"
    if preset not in PRESETS:
        raise ValueError(f"unknown evaluate preset {preset!r}; expected one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.name = "base"  # the method: its folder under --workdir and its row in comparison.md
    c.model = ""  # the base diffusers pipeline folder
    c.checkpoint = ""  # optional training / merge workdir (LoRA, merged delta or PSA adapter)
    c.step = -1  # checkpoint step (-1: latest)
    c.dtype = "float32"  # or bfloat16
    c.attention = "auto"  # the UNet's attention: auto | xla | chunked | cudnn | pallas (models.attention)
    c.benchmarks = PRESETS[preset]  # comma-separated names of BENCHMARKS
    c.prompts_dir = "../shared/data/eval_prompts"  # the released prompt files (data/README.md)
    c.prompts_file = ""  # benchmark "custom": a .csv (prompt/caption column) or .txt file
    c.limit = 0  # only the first `limit` prompts of each benchmark (0: all)

    c.generation = ml_collections.ConfigDict()
    c.generation.steps = 50
    c.generation.guidance = 7.5
    c.generation.sampler = "pipeline"  # the scheduler class the pipeline names (PNDM for SD1.5)
    c.generation.seed = 0  # row i gets seed `seed + i` unless the file has seeds (I2P sd_seed)
    c.generation.use_file_seeds = True
    c.generation.seeding = "per_prompt"  # or single_stream: SafetyDPO's one stream seeded once (file seeds ignored)
    c.generation.negative_prompt = PSA_NEGATIVE_PROMPT if preset == "psa" else ""
    c.generation.height = 0  # 0: the model's native size
    c.generation.width = 0
    c.generation.batch_size = 4

    c.psa = ml_collections.ConfigDict()
    c.psa.level = -1  # 0..5: every image for that level's user; -1: the prompt's own user (Sage)
    c.psa.center_users = ""  # a center_users.csv to derive levels from; "": the official level table
    c.psa.user_id = ""  # one user for every image instead
    c.psa.embeddings = ""  # folder of {user_id}.npy user embeddings (needed by a PSA adapter)
    c.psa.users = "../shared/data/sage/users/users.csv"  # profiles for the judge

    c.metrics = ml_collections.ConfigDict()
    c.metrics.q16 = True  # IP: Q16 (CLIP ViT-L/14 vs learned prompts) ...
    c.metrics.nudenet = True  # ... or NudeNet genitalia detections
    c.metrics.fid = preset in ("safetydpo", "psa", "coco")  # COCO only
    c.metrics.clip_score = True
    c.metrics.clip_benchmarks = "coco,custom"  # where CLIPScore is computed
    c.metrics.pass_rate = preset in ("psa", "sage_seen", "sage_unseen")  # judge; needs users
    c.metrics.win_rate = False  # judge: this method vs judge.baseline, same prompt/seed/user
    c.metrics.fid_reference_limit = 0  # use the first N reference images (0: all)
    c.metrics.batch_size = 16  # images per metric forward
    c.metrics.device = "auto"  # torch device of Q16, CLIPScore, FID: auto (CUDA if torch sees one) | cpu | cuda
    c.metrics.grid_images = 16  # images in each benchmark's grid (0: none)

    c.models = ml_collections.ConfigDict()
    c.models.q16_clip = ""  # transformers CLIP ViT-L/14 folder (openai/clip-vit-large-patch14)
    c.models.q16_prompts = "../shared/data/q16/q16_vit_l14_prompts.npy"
    c.models.nudenet = ""  # NudeNet detector weights (see README: evaluation)
    c.models.inception = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth ('' = torch hub cache)
    c.models.fid_reference = ""  # folder of real COCO val images, or an .npz with mu and sigma
    c.models.clip_score = ""  # CLIPScore model folder (official: open_clip ViT-H-14)
    c.models.clip_score_kind = "transformers"  # or "open_clip" (needs open_clip_torch)

    c.judge = ml_collections.ConfigDict()
    c.judge.base_url = "https://api.openai.com/v1"  # any OpenAI-compatible chat-completions server
    c.judge.model = "gpt-4.1-mini"
    c.judge.api_key_env = "OPENAI_API_KEY"  # name of the environment variable ('' = no key)
    c.judge.temperature = 0.1
    c.judge.attempts = 4
    c.judge.backoff_s = 2.0
    c.judge.timeout_s = 60.0
    c.judge.seed = 0  # fixes each pair's A/B order
    c.judge.baseline = "base"  # win rate: the method name (folder under --workdir) to compare with
    return c
