"""The main job. For now: prove the Flax UNet port equals diffusers on a random model.

    python scripts/demo.py --config configs/demo.py[:sd1|sd2|sdxl] --workdir runs/demo
"""

import json
import os
import time

import jax
import numpy as np

from safealign_jax import cli
from safealign_jax.errors import UserError
from safealign_jax.models import load_unet, param_count

CONFIG = cli.define_flags()

STRUCTURES = {
    "sd1": dict(block_out_channels=(64, 128, 128), cross_attention_dim=64, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(64, 128, 128), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48),
}


def main(config, workdir):
    try:
        import torch
        from diffusers import UNet2DConditionModel as TorchUNet
    except ImportError:
        raise UserError("the demo needs the torch extra: run `make demo` (it installs it).") from None
    if config.family not in STRUCTURES:
        raise UserError(f"--config.family={config.family!r} is unknown (expected one of {list(STRUCTURES)}).")
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(config.seed)
    reference = TorchUNet(sample_size=config.latent_size, norm_num_groups=16, **STRUCTURES[config.family]).eval()
    folder = os.path.join(workdir, f"unet_{config.family}")
    reference.save_pretrained(folder)

    module, params = load_unet(folder)
    rng = np.random.default_rng(config.seed)
    x = rng.standard_normal((config.batch, config.latent_size, config.latent_size, 4), np.float32)
    t = rng.integers(0, 1000, config.batch).astype(np.int32)
    context = rng.standard_normal((config.batch, 77, 64), np.float32)
    added = None
    if config.family == "sdxl":
        added = {"text_embeds": rng.standard_normal((config.batch, 32), np.float32),
                 "time_ids": np.tile(np.float32([[256, 256, 0, 0, 256, 256]]), (config.batch, 1))}
    apply = jax.jit(module.apply)
    ours = np.asarray(apply({"params": params}, x, t, context, added))
    start = time.perf_counter()
    jax.block_until_ready(apply({"params": params}, x, t, context, added))
    jax_seconds = time.perf_counter() - start

    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
    with torch.no_grad():
        start = time.perf_counter()
        theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                           torch.from_numpy(context), **kwargs).sample.numpy().transpose(0, 2, 3, 1)
        torch_seconds = time.perf_counter() - start
    report = {
        "family": config.family,
        "parameters": param_count(params),
        "max_abs_error": float(np.abs(ours - theirs).max()),
        "relative_error": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
        "jax_forward_s": jax_seconds,
        "torch_forward_s": torch_seconds,
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli.run(main, CONFIG)
