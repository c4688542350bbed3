"""Diffusion-DPO LoRA training (SafetyDPO recipe) and PSA user-adapter training. Presets: tiny (CPU
smoke run), sd15, sd21, sdxl, psa_sd15, psa_sdxl.

    python scripts/train.py --config configs/train.py:sd15 --workdir runs/sd15 \
        --config.model.path=/models/sd15

Hyperparameters of sd15/sd21/sdxl follow docs/METHODS.md section 2 (official SafetyDPO recipe, arXiv 2412.10493):
LoRA rank 4 = alpha on to_q/to_k/to_v/to_out.0, AdamW(0.9, 0.999, wd 1e-2, eps 1e-8),
lr 1e-5 x pairs per step, 500 warm-up steps then constant, clip 1.0, 2,000 steps,
16 pairs per device, beta 5000, caption dropout 0.2; SDXL (the official SDXL launcher): Adafactor,
lr 1e-5 NOT scaled by pairs, no warm-up, no gradient clipping, remat at 1024 px.
Like the official script, which trains on every row of the released parquet table (each pair
once with its harmful and once with its safe caption), they set data.both_captions=True.

psa_sd15 / psa_sdxl (docs/METHODS.md section 3, PSA, arXiv 2508.01151): the user adapter (E=3584, N=1, lambda=1) trained on
Sage (data.source=sage_cache + data.embeddings), beta 5000, fp32 adapter weights. SD1.5: AdamW
lr 5e-6 (not scaled by pairs), 500 warm-up, 192 pairs per update (24 per device on 8 devices:
keep pairs_per_device x devices x grad_accum = 192), 5,000 updates. SDXL: Adafactor, remat,
1024 px, 128 pairs per update (16 per device on 8 devices). psa.train_lora=True also trains a
SafetyDPO LoRA together with the adapter. psa.variant=gated trains user gates over per-category
deltas instead (psa.gated.experts: one LoRA / delta run per category; README "User-gated PSA").
"""

import ml_collections

from safealign_jax.configs import choose_preset

PRESETS = ("tiny", "sd15", "sd21", "sdxl", "psa_sd15", "psa_sdxl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = choose_preset("train", arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers pipeline or unet/ folder; "" only for tiny (random UNet in-process)
    c.model.variant = ""  # weights variant, e.g. "fp16"
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (the UNet module dtype)
    c.model.param_dtype = "float32"  # float32 | bfloat16: storage of the frozen base (LoRA/adapter stay fp32)
    c.model.remat_policy = "none"  # none | full | dots | dots_no_batch (per UNet block) | <those>_per_layer
    c.model.attention = "auto"  # auto | xla | chunked | cudnn | pallas (safealign_jax.models.attention)
    c.model.prediction_type = "epsilon"  # used when the folder has no scheduler config

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.lora.targets = r"(^|/)(to_q|to_k|to_v|to_out_0)$"  # regex on "/"-joined Dense paths (SafetyDPO's)
    c.lora.init_from = ""  # a run folder (delta or LoRA, e.g. scripts/erase.py's edit): start at its rank-r fit

    c.psa = ml_collections.ConfigDict()
    c.psa.enable = False  # train the PSA user adapter (batches carry user_embedding (B, E))
    c.psa.embed_dim = 3584  # E: user-embedding width (Qwen2.5-7B-Instruct)
    c.psa.num_tokens = 1  # N: user tokens
    c.psa.scale = 1.0  # lambda of the user branch
    c.psa.train_lora = False  # also train a LoRA (config lora) with the adapter
    c.psa.variant = "adapter"  # adapter (the paper's user cross-attention) | gated (safealign_jax.gated)
    c.psa.gated = ml_collections.ConfigDict()  # variant=gated: per-category deltas x gates sigmoid(W u + b)
    c.psa.gated.experts = ""  # comma-separated run folders (LoRA or delta runs), one per category, in order
    c.psa.gated.categories = ""  # comma-separated category names, same order ("" = the folder names)
    c.psa.gated.rank = 0  # SVD factor rank per layer (0 = exact, min(in, out); LoRA experts: their rank is exact)
    c.psa.gated.init_bias = 0.0  # gate bias b at the start (gates sigmoid(b) for every user)
    c.psa.gated.train_experts = False  # False: only W, b train; True: the category factors too
    c.psa.gated.route = False  # True: each pair's row uses only its category's gate (batches carry category_index)
    c.psa.gated.hard = False  # True: sampling / export use the gates thresholded at 0.5 (each category on or off)

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 5000.0
    c.dpo.caption_dropout = 0.2
    c.dpo.objective = "dpo"  # dpo (the paper's Diffusion-DPO, plus the terms below) | sft (baseline)
    c.dpo.sft_weight = 0.0  # + w * denoising loss on the preferred image (same noise / t); 0 = off
    c.dpo.preserve_weight = 0.0  # + w * mean (policy - reference)^2 on retain prompts; 0 = off
    c.dpo.retain_prompts = ""  # preserve_weight > 0: .txt (one per line) or .csv ('prompt' column)
    c.dpo.sdpo = False  # Diffusion-SDPO: scale the loser's gradient so the winner's error does not rise
    c.dpo.sdpo_mu = 0.9  # its margin mu in [0, 1) (official launchers: 0.9 SD1.5, 0.6 SDXL)
    c.dpo.noise_offset = 0.0  # noise += w * N(0, 1) per image and channel (official option)
    c.dpo.input_perturbation = 0.0  # input noised with noise + w * N(0, I), target keeps noise

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
    c.train.skip_nonfinite = False  # True: skip a step with non-finite loss/gradient (else stop)
    c.train.progress_bar = True  # the tqdm bar and one line per start-up stage (--verbosity=-2: none)
    c.train.tensorboard = True  # workdir/tensorboard events when tensorboardX is installed (extra `tensorboard`)
    c.train.sample_every = 0  # >0: write samples/step_XXXXXX.png (needs model.path in a pipeline folder)
    c.train.sample_prompts = "a photo of a cat|a city street at night|a portrait of a person"  # '|'-separated
    c.train.sample_steps = 25
    c.train.sample_guidance = 7.5
    c.train.compilation_cache = ""  # persistent XLA compilation cache; "" = the commands' (cli.compilation_cache_folder), else workdir/compilation_cache

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: fill with the remaining devices
    c.mesh.fsdp = 1
    c.mesh.shard_params = False  # fsdp-shard frozen base params of at least shard_min_size scalars
    c.mesh.shard_min_size = 1 << 20

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic (random pairs) | cache (CoProV2) | sage_cache (PSA)
    c.data.cache_dir = ""  # source=cache: the latent cache folder
    c.data.category = ""  # source=cache: one CoProV2 category (expert training), or several "A,B"; "" = all
    c.data.both_captions = False  # source=cache: each pair also captioned with its safe prompt
    # (True in sd15/sd21/sdxl: every parquet row, as the official script trains)
    c.data.flip = "none"  # source=cache: none | shared | independent (flips the cached latents)
    c.data.num_threads = 4  # source=cache: reader threads prefetching batches
    c.data.embeddings = ""  # source=sage_cache: folder of {user_id}.npy user embeddings
    c.data.missing_embedding = "error"  # source=sage_cache: error | zeros (no {id}.npy: zero vector, as official PSA)
    c.data.resolution = 512  # pixels; latents are resolution // 8
    c.data.seq_len = 77
    c.data.latent_channels = 4

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize() (multi-host)
    c.distributed.coordinator = ""  # "" = auto-detect (TPU / SLURM / ...)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    # A dead process makes the others fail after about heartbeat_timeout_s (instead of hanging).
    c.distributed.initialization_timeout_s = 300
    c.distributed.heartbeat_timeout_s = 100
    c.distributed.shutdown_timeout_s = 300

    c.experts = ml_collections.ConfigDict()  # scripts/train_experts.py (SafetyDPO safety experts)
    c.experts.categories = ""  # comma-separated categories of the cache; "" = every one (metadata category_index)
    c.experts.all_single = False  # also train the "all-single" baseline (one LoRA, all categories)
    c.experts.all_single_steps = 0  # its steps; 0 = number of experts x train.steps (equal compute)

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
    elif preset in ("sdxl", "psa_sdxl"):
        c.optim.name = "adafactor"
        c.model.remat_policy = "full_per_layer"  # BENCHMARKS.md "Compiled memory": per layer keeps least
        c.data.resolution = 1024
    if preset == "sdxl":  # the official SDXL launcher: lr 1e-5 not scaled by pairs, no warm-up, no clipping
        c.optim.scale_lr_by_pairs, c.optim.warmup_steps, c.optim.clip_norm = False, 0, 0.0
    if preset != "tiny":  # accelerator presets: bf16 compute and frozen base; fp32 LoRA, loss
        c.model.compute_dtype = c.model.param_dtype = "bfloat16"
    if preset in ("sd15", "sd21", "sdxl"):
        c.data.both_captions = True
    if preset.startswith("psa_"):
        c.psa.enable = True
        c.data.source = "sage_cache"
        c.optim.learning_rate, c.optim.scale_lr_by_pairs = 5e-6, False
        c.train.steps = 5000
        c.train.pairs_per_device = 24 if preset == "psa_sd15" else 16
        c.train.checkpoint_every = 500
    return c
