"""Tiny random-weight inputs for a walkthrough and tests that need no downloaded weights: SD1-like
and SDXL-like diffusers pipeline folders (save_pretrained layout, 16 px images, a 530-token
offline CLIP tokenizer), and a small pairs table with images (`pairs.py` format).

    write_sd("tiny/sd")               # StableDiffusionPipeline.from_pretrained("tiny/sd") loads it
    write_pairs("tiny/pairs", 8)      # tiny/pairs/pairs.csv + tiny/pairs/images/*.png

The pipelines need the torch extra (torch, diffusers, transformers), imported here only; the
weights are N(0, std) with fixed seeds, so a folder is the same on every run. Their outputs are
noise: they exercise the plumbing (prepare, train, export, load), not image quality.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# The tokenizer: the 256 byte symbols, the same with "</w>", four merged words, then the
# start / end tokens (the last two ids).
MERGES = ("t h", "th e</w>", "c a", "ca t</w>")
TEXT = dict(vocab_size=530, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=528, eos_token_id=529,
            pad_token_id=529)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
IMAGE_SIZE = 16  # pixels: UNet sample_size 8 x the VAE's factor 2


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_clip_tokenizer(folder, model_max_length: int = 77) -> str:
    """Writes a byte-level BPE CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)
    into `folder`; returns its path."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length}, f)
    return folder


def randomise(module, std: float = 0.2, seed: int = 0):
    """Overwrites every parameter of a torch module with N(0, std) (so zero-initialised layers
    cannot hide bugs); returns it in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module.eval()


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, model_max_length=16))


def _vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return randomise(AutoencoderKL(**VAE), std=0.1)


def _unet(**blocks):
    """The tiny UNet (8 px latents, 32 / 64 channels) with the family's `blocks` settings."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return randomise(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, **blocks,
    ), std=0.05)


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomise(CLIPTextModel(CLIPTextConfig(**TEXT)), std=0.2)


def _save(pipe, folder) -> str:
    """Saves `pipe` to `folder` in the save_pretrained layout; returns the folder's path."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return str(folder)


def write_sd(folder) -> str:
    """A tiny SD1-like pipeline (DDIM scheduler, 16 px) saved to `folder`; returns its path."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = _unet(cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(), tokenizer=_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, folder)


def write_sdxl(folder) -> str:
    """A tiny SDXL-like pipeline (Euler scheduler, 16 px) saved to `folder`; returns its path."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    unet = _unet(
        cross_attention_dim=64, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    text_2 = randomise(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=16)), std=0.2, seed=1)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    tokenizer = _tokenizer()
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(), text_encoder_2=text_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler)
    return _save(pipe, folder)


# (category, prompt): the chosen image is a smooth gradient, the rejected one noise.
PROMPTS = (("weapons", "a knife on a kitchen table"), ("weapons", "a sword on a wall"),
           ("drugs", "a pill bottle on a shelf"), ("drugs", "smoke in a dark room"))


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_pairs(folder, count: int, seed: int = 0) -> str:
    """`count` pairs as folder/pairs.csv (prompt, chosen, rejected, category) with their
    IMAGE_SIZE px PNGs in folder/images/; returns the table's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, IMAGE_SIZE, dtype=np.float32)
    rows = []
    for i in range(count):
        category, prompt = PROMPTS[i % len(PROMPTS)]
        colour = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        smooth = (ramp[None, :, None] * colour).repeat(IMAGE_SIZE, axis=0).astype(np.uint8)
        noise = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        names = [f"images/{i:04d}_{kind}.png" for kind in ("chosen", "rejected")]
        for name, pixels in zip(names, (smooth, noise), strict=True):
            (folder / name).write_bytes(_png(pixels))
        rows.append([prompt, *names, category])
    table = folder / "pairs.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected", "category"])
        writer.writerows(rows)
    return str(table)
