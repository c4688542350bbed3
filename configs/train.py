"""Diffusion-DPO LoRA training (SafetyDPO recipe). Presets: tiny (CPU smoke run), sd15, sd21, sdxl.

    python scripts/train.py --config configs/train.py:sd15 --workdir runs/sd15 \
        --config.model.path=/models/sd15

Hyperparameters of sd15/sd21/sdxl follow SPEC.md section 2 (official SafetyDPO recipe):
LoRA rank 4 = alpha on to_q/to_k/to_v/to_out.0, AdamW(0.9, 0.999, wd 1e-2, eps 1e-8),
lr 1e-5 x pairs per step, 500 warm-up steps then constant, clip 1.0, 2,000 steps,
16 pairs per device, beta 5000, caption dropout 0.2; SDXL: Adafactor + remat at 1024 px.
"""

import ml_collections

PRESETS = ("tiny", "sd15", "sd21", "sdxl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"configs/train.py:{preset}: unknown preset (expected one of {PRESETS}).")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers pipeline or unet/ folder; "" only for tiny (random UNet in-process)
    c.model.variant = ""  # weights variant, e.g. "fp16"
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (the UNet module dtype)
    c.model.remat_policy = "none"  # none | full | dots | dots_no_batch
    c.model.prediction_type = "epsilon"  # used when the folder has no scheduler config

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 4
    c.lora.alpha = 4.0

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 5000.0
    c.dpo.caption_dropout = 0.2

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | adafactor
    c.optim.learning_rate = 1e-5  # per pair when scale_lr_by_pairs
    c.optim.scale_lr_by_pairs = True  # lr x global pairs per update (official launcher)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 500
    c.optim.schedule = "constant"  # constant | cosine (after warm-up)
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.optim.grad_accum = 1  # micro-batches per update (optax.MultiSteps)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000  # micro-steps (one batch each)
    c.train.pairs_per_device = 16
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.progress_bar = True
    c.train.sample_every = 0  # >0: write samples/step_XXXXXX.png (needs model.path in a pipeline folder)
    c.train.sample_prompts = "a photo of a cat|a city street at night|a portrait of a person"  # '|'-separated
    c.train.sample_steps = 25
    c.train.sample_guidance = 7.5

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: fill with the remaining devices
    c.mesh.fsdp = 1
    c.mesh.shard_params = False  # fsdp-shard frozen base params of at least shard_min_size scalars
    c.mesh.shard_min_size = 1 << 20

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic (random latent pairs) | cache (scripts/prepare_data.py)
    c.data.cache_dir = ""  # source=cache: the latent cache folder
    c.data.category = ""  # source=cache: one CoProV2 category's pairs (expert training); "" = all
    c.data.both_captions = False  # source=cache: each pair also captioned with its safe prompt
    c.data.flip = "none"  # source=cache: none | shared | independent (flips the cached latents)
    c.data.num_threads = 4  # source=cache: reader threads prefetching batches
    c.data.resolution = 512  # pixels; latents are resolution // 8
    c.data.seq_len = 77
    c.data.latent_channels = 4

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize() (multi-host)
    c.distributed.coordinator = ""  # "" = auto-detect (TPU / SLURM / ...)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    if preset == "tiny":
        c.lora.rank, c.lora.alpha = 2, 2.0
        c.optim.learning_rate, c.optim.scale_lr_by_pairs = 1e-3, False
        c.optim.warmup_steps = 2
        c.train.steps, c.train.pairs_per_device = 10, 2
        c.train.log_every, c.train.checkpoint_every = 5, 5
        c.data.resolution, c.data.seq_len = 128, 8
    elif preset == "sd21":
        c.data.resolution = 768
        c.model.prediction_type = "v_prediction"
    elif preset == "sdxl":
        c.optim.name = "adafactor"
        c.model.remat_policy = "full"
        c.model.compute_dtype = "bfloat16"
        c.data.resolution = 1024
    return c
