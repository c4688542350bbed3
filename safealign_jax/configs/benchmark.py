"""Side-by-side benchmark of our jitted Diffusion-DPO step and sampler against the PyTorch
reference (diffusers + peft), and the compiled memory of the train step. Presets: tiny (CPU / CI
size), sd15 (512 px), sdxl (1024 px).

    python scripts/benchmark.py --config configs/benchmark.py:tiny --workdir runs/bench
    python scripts/benchmark.py --config configs/benchmark.py:sd15 --config.mode=memory --workdir runs/mem

Random weights at the real UNet configs (nothing is downloaded): the UNet is built by diffusers,
saved, and loaded by `load_unet`, so both sides run identical weights. See BENCHMARKS.md.
"""

import ml_collections

from safealign_jax.configs import choose_preset

PRESETS = ("tiny", "sd15", "sdxl")

# diffusers UNet2DConditionModel configs.
TINY_UNET = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8,
)
SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# transformers CLIPTextConfig / diffusers AutoencoderKL configs of the sampling pipelines.
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = choose_preset("benchmark", arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.mode = "compare"  # compare (both sides timed) | memory (XLA's memory analysis of our step only)
    c.seed = 0
    c.unet = dict(TINY_UNET)  # a diffusers UNet2DConditionModel config (random weights)
    c.resolution = 128  # pixels; latents are resolution // 8
    c.seq_len = 77  # text tokens
    c.pairs = 2  # preference pairs per step (both sides, one device)

    c.compute_dtype = "float32"  # float32 | bfloat16 (JAX module dtype; torch autocast on GPU)
    # none | full | dots | dots_no_batch (per UNet block) | full_per_layer | dots_per_layer |
    # dots_no_batch_per_layer (per ResnetBlock2D / BasicTransformerBlock; models/remat.py);
    # torch: gradient checkpointing if not none. mode=memory compiles with this policy too.
    c.remat_policy = "none"
    c.attention = "auto"  # auto | xla | chunked | cudnn | pallas (safealign_jax.models.attention)
    c.lora_rank = 4  # alpha = rank; targets to_q, to_k, to_v, to_out.0
    c.beta = 5000.0
    c.learning_rate = 1e-5  # AdamW (0.9, 0.999, eps 1e-8, wd 1e-2), clip 1.0, both sides

    c.warmup = 2  # untimed steps (compilation / autotuning) before the timed ones
    c.repeats = 5  # timed repeats; the table shows their median
    c.steps_per_repeat = 2  # steps per timed repeat
    c.torch_compile = True  # also time torch.compile(unet) ("n/a" with the reason if it fails)
    c.parity = True  # fp32 loss of both sides on the same noise, t, latents and text states
    # beta of the parity loss: at 5000, one fp32 ulp of a per-image error (~6e-8) moves the
    # margin by 1.5e-4, so the loss itself could not agree to 1e-4 between any two fp32 programs.
    c.parity_beta = 100.0
    # each side in its own worker process, all pinned to the same CPUs, timed repeats alternating
    # between the sides (on CPU torch's threads otherwise compete with XLA's in one process)
    c.isolate = True
    c.threads = 0  # CPUs both sides are pinned to (the first n of this process's); 0 = all

    c.sampling = ml_collections.ConfigDict()
    c.sampling.enabled = True  # images/s of our pipeline vs diffusers' (DDIM, CFG)
    c.sampling.steps = 4
    c.sampling.guidance = 7.5
    c.sampling.batch = 2  # prompts per call
    c.sampling.repeats = 3
    c.sampling.text = dict(TINY_TEXT)  # CLIP text encoder config (SDXL: text_encoder)
    c.sampling.text_2 = {}  # SDXL: the second (projection) encoder
    c.sampling.vae = dict(TINY_VAE)

    c.peak_matmul_size = 2048  # n of the fp32 matmul that measures the peak where no datasheet applies
    # mode=memory: the train step of configs/train.py:<preset> at this many pairs per device
    c.memory_pairs_per_device = 2

    if preset == "tiny":
        c.seq_len = 8
        c.repeats, c.steps_per_repeat = 7, 3  # a shared CPU is noisy: more repeats
        c.sampling.repeats = 7
    elif preset == "sd15":
        c.unet = dict(SD15_UNET)
        c.resolution, c.pairs = 512, 4
        c.compute_dtype = "bfloat16"
        c.sampling.steps, c.sampling.batch = 50, 4
        c.sampling.text, c.sampling.vae = dict(CLIP_L), dict(SD_VAE)
        c.peak_matmul_size = 8192
        c.memory_pairs_per_device = 16  # the SafetyDPO recipe
    else:
        c.unet = dict(SDXL_UNET)
        c.resolution, c.pairs = 1024, 1
        c.compute_dtype = "bfloat16"
        c.remat_policy = "full_per_layer"  # as configs/train.py:sdxl
        c.sampling.steps, c.sampling.batch = 50, 2
        c.sampling.text, c.sampling.text_2 = dict(CLIP_L), dict(CLIP_G)
        c.sampling.vae = dict(SD_VAE)
        c.peak_matmul_size = 8192
        c.memory_pairs_per_device = 4
    return c
