"""The world's base text-to-image model: a diffusers-layout pipeline folder (our UNet port at a
tiny size, the world's tokenizer and random frozen CLIP text encoder, the exact space-to-depth
"VAE", SD's DDPM schedule) and its pretraining on renders of the world.

    folder = build_pipeline(world, "runs/demo/base", unet_config, seed)   # untrained UNet
    pretrain(world, folder, steps=3000, batch=64, learning_rate=1e-3)    # rewrites unet/

Pretraining is plain denoising (MSE to x0: the world's UNet predicts the clean sample, which
learns a near-deterministic world much faster than epsilon) on (prompt, render) pairs of the training
phrasings, with 10% of captions replaced by "" so classifier-free guidance works.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from safealign_jax.convert.unet_files import save_unet_folder
from safealign_jax.data.cache import encode_texts
from safealign_jax.models import load_tokenizer, load_unet
from safealign_jax.models.space_to_depth import SpaceToDepthConfig, space_to_depth
from safealign_jax.models.unet import UNet2DConditionModel
from safealign_jax.models.unet_config import UNetConfig
from safealign_jax.pipeline import load_pipeline
from safealign_jax.schedulers import add_noise, ddpm_schedule, scheduler_config_from_dict, target
from safealign_jax.synthetic import text
from safealign_jax.synthetic.world import IMAGE_SIZE, World, prompt, training_templates

MAX_TOKENS = 16
TEXT_BATCH = 512  # prompts per text-encoder call (one compiled shape)
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "sample",
             "clip_sample": True, "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading"}


def unet_config(block_out_channels=(32, 64), cross_attention_dim: int = 64, block_size: int = 2) -> dict:
    """The diffusers UNet2DConditionModel config of the world's UNet (sample = 16 / block_size)."""
    channels = block_size**2 * 3
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": IMAGE_SIZE // block_size,
        "in_channels": channels, "out_channels": channels,
        "block_out_channels": list(block_out_channels), "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D"] * len(block_out_channels),
        "up_block_types": ["CrossAttnUpBlock2D"] * len(block_out_channels),
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8, "norm_num_groups": 8,
    }


def build_pipeline(world: World, folder: str, unet: dict, seed: int, text_width: int = 64,
                   prediction_type: str = "sample") -> str:
    """Writes every component of the world's pipeline; the UNet with seeded random weights and
    the scheduler with `prediction_type` ("sample" = x0, "v_prediction" or "epsilon")."""
    os.makedirs(folder, exist_ok=True)
    vocab = text.write_tokenizer(os.path.join(folder, "tokenizer"), world.vocabulary(), MAX_TOKENS)
    text.write_text_encoder(os.path.join(folder, "text_encoder"),
                            text.text_encoder_config(len(vocab), MAX_TOKENS, text_width, 2, 4), seed)
    text.check_single_tokens(load_tokenizer(folder), world.vocabulary())
    block = IMAGE_SIZE // unet["sample_size"]
    _write_json(os.path.join(folder, "vae", "config.json"), SpaceToDepthConfig(block_size=block).to_diffusers())
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                {**SCHEDULER, "prediction_type": prediction_type})
    _write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["safealign_jax", "SpaceToDepthAutoencoder"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
    })
    module = UNet2DConditionModel(UNetConfig.from_diffusers(unet))
    params = jax.device_get(module.init(jax.random.key(seed), *module.dummy_inputs())["params"])
    save_unet_folder(os.path.join(folder, "unet"), unet, params)
    return folder


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def pretrain(world: World, folder: str, *, steps: int, batch: int, learning_rate: float, seed: int,
             caption_dropout: float = 0.1, progress: bool = True) -> dict:
    """Trains the pipeline's UNet to draw the world; rewrites `folder/unet`. Returns a summary
    (final loss = mean of the last 100 steps, seconds, steps/s)."""
    scenes = world.all_scenes()
    templates = list(training_templates())
    prompts = [prompt(s, t) for s in scenes for t in templates]
    states, _ = encode_texts(load_pipeline(folder), prompts + [""], batch=TEXT_BATCH)
    empty, states = states[-1], states[:-1]
    module, params = load_unet(folder)
    vae_block = IMAGE_SIZE // module.config.sample_size
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        schedule = ddpm_schedule(scheduler_config_from_dict(json.load(f), "world scheduler"))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, steps // 10 + 1), steps, learning_rate * 0.05),
        weight_decay=1e-4))
    opt_state = optimizer.init(params)

    def loss_fn(p, latents, context, key):
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_n, latents.shape)
        noisy = add_noise(schedule, latents, noise, t)
        prediction = module.apply({"params": p}, noisy, t, context)
        return jnp.mean(jnp.square(prediction - target(schedule, latents, noise, t)))

    @jax.jit
    def step(p, o, latents, context, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, latents, context, key)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, dynamic_ncols=True)
    for i in bar:
        rows = rng.integers(len(prompts), size=batch)
        images = np.stack([world.depict(scenes[r // len(templates)], rng) for r in rows])
        latents = space_to_depth(images, vae_block)
        context = states[rows].copy()
        context[rng.random(batch) < caption_dropout] = empty
        params, opt_state, loss = step(params, opt_state, latents, context, jax.random.fold_in(key, i))
        losses.append(loss)
        if i % 100 == 99:
            bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses[-100:]))):.4f}")
    losses = np.asarray(jax.device_get(losses))
    seconds = time.perf_counter() - start
    with open(os.path.join(folder, "unet", "config.json")) as f:
        config = json.load(f)
    save_unet_folder(os.path.join(folder, "unet"), config, jax.device_get(params))
    return {"steps": steps, "batch": batch, "final_loss": float(losses[-100:].mean()),
            "seconds": seconds, "steps_per_s": steps / seconds}
