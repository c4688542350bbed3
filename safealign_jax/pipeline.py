"""Text-to-image generation for SD1.x / SD2.x / SDXL with the Flax ports.

    pipe = load_pipeline("path/to/pipeline")
    images = generate(pipe, ["a cat"], seeds=[0], num_steps=50, guidance=7.5)   # (B, H, W, 3) in [0, 1]

The whole denoising loop (classifier-free guidance, sampler steps) is one compiled
`lax.fori_loop`. Each image's initial noise and sampler noise come from its own seed, so an image
is the same whatever else is in the batch. Hooks: `lora` (a "lora" collection from
`safealign_jax.trainable.Trainable.collections`, or pass folded params), `adapter` + `user_embeddings` (PSA: the
unconditional branch uses the negative prompt and the projection of a zero embedding).
"""

import dataclasses
import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.convert.checkpoint import read_config
from safealign_jax.errors import UserError, check
from safealign_jax.models import load_text_encoder, load_tokenizer, load_unet, load_vae, tokenize
from safealign_jax.models.embeddings import sdxl_time_ids
from safealign_jax.models.layers import Dtype
from safealign_jax.models.resolve import resolve_model
from safealign_jax.schedulers import SchedulerConfig, make_sampler, read_scheduler_config
from safealign_jax.trainable import Trainable


@dataclasses.dataclass
class Pipeline:
    """The loaded components of a diffusers SD / SDXL pipeline folder.

    `text_encoders` / `tokenizers` have one entry (SD1/2) or two (SDXL: CLIP-L then OpenCLIP-G).
    """

    unet: object
    unet_params: dict
    vae: object
    vae_params: dict
    text_encoders: list
    text_params: list
    tokenizers: list
    scheduler: SchedulerConfig
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def vae_scale(self) -> int:
        return self.vae.config.downsample_factor


def load_pipeline(
    folder: str, dtype: Dtype = jnp.float32, variant: str | None = None, unet: tuple | None = None,
    attention: str | None = None,
) -> Pipeline:
    """Loads every component of a diffusers pipeline folder (model_index.json layout), or of a hub
    id `ORG/NAME` in the local Hugging Face cache (`models.resolve.resolve_model`).

    `unet`: an already loaded (module, params) to use instead of reading unet/ again (e.g. the
    trainer's sharded base params). `attention`: the UNet's attention implementation
    (`models.attention.IMPLEMENTATIONS`); None keeps the module's.
    """
    folder = resolve_model(folder)
    index = read_config(folder, "model_index.json")
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        check(
            os.path.isdir(os.path.join(folder, component)),
            f"{folder}: the pipeline has no {component}/ folder.",
        )
    sdxl = "text_encoder_2" in index
    suffixes = ["", "_2"] if sdxl else [""]
    encoders = [load_text_encoder(folder, f"text_encoder{s}", dtype=dtype, variant=variant) for s in suffixes]
    unet, unet_params = unet or load_unet(folder, dtype=dtype, variant=variant)
    if attention is not None:
        unet = unet.clone(attention=attention)
    vae, vae_params = load_vae(folder, dtype=dtype, variant=variant)
    return Pipeline(
        unet=unet,
        unet_params=unet_params,
        vae=vae,
        vae_params=vae_params,
        text_encoders=[m for m, _ in encoders],
        text_params=[p for _, p in encoders],
        tokenizers=[load_tokenizer(folder, f"tokenizer{s}") for s in suffixes],
        scheduler=read_scheduler_config(folder),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
    )


def encode_prompts(pipe: Pipeline, prompts: list[str]) -> tuple[jax.Array, jax.Array | None]:
    """Prompts -> (text states (B, S, D), pooled (B, P) for SDXL else None), as diffusers does.

    SD1/2 condition on the last hidden state; SDXL on the concatenated penultimate states of both
    encoders and the projected pooled output of the second.
    """
    states, pooled = [], None
    for module, params, tokenizer in zip(pipe.text_encoders, pipe.text_params, pipe.tokenizers, strict=True):
        out = _encode(module, params, jnp.asarray(tokenize(tokenizer, prompts)))
        states.append(out.penultimate_hidden_state if pipe.is_sdxl else out.last_hidden_state)
        pooled = out.text_embeds
    return jnp.concatenate(states, axis=-1), pooled if pipe.is_sdxl else None


@partial(jax.jit, static_argnums=0)
def _encode(module, params, ids):
    return module.apply({"params": params}, ids)


def initial_noise(seeds, shape: tuple[int, int, int]) -> jax.Array:
    """(B, H, W, C) float32 N(0, I) latents, image b drawn from `jax.random.key(seeds[b])`."""
    return jnp.stack([jax.random.normal(jax.random.key(int(s)), shape, jnp.float32) for s in seeds])


def _rescale_guidance(guided, conditional, rescale):
    """diffusers' rescale_noise_cfg (Lin et al. 2023, eq. 15-16), unbiased std as torch."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(conditional, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return rescale * guided * ratio + (1 - rescale) * guided


@partial(jax.jit, static_argnums=0)
def _denoise(unet, sampler, variables, latents, context, added, user_tokens, keys, guidance, rescale):
    """The compiled loop (one compile per UNet, sampler and shapes). context/added/user_tokens
    hold [unconditional; conditional] (2B rows)."""

    def body(i, carry):
        x, state = carry
        model_in = sampler.scale_model_input(state, x, i)
        out = unet.apply(
            variables, jnp.concatenate([model_in, model_in]), sampler.timesteps[i],
            context, added, user_tokens,
        ).astype(jnp.float32)
        uncond, cond = jnp.split(out, 2)
        guided = uncond + guidance * (cond - uncond)
        guided = jax.lax.cond(rescale > 0, lambda g: _rescale_guidance(g, cond, rescale), lambda g: g, guided)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        step = lambda s, o, xi, k: sampler.step(s, o[None], i, xi[None], k)  # noqa: E731
        x, state = jax.vmap(lambda s, o, xi, k: jax.tree.map(lambda a: a[0], step(s, o, xi, k)))(
            state, guided, x, step_keys
        )
        return x, state

    x = latents * sampler.init_noise_sigma
    state = jax.vmap(lambda xi: jax.tree.map(lambda a: a[0], sampler.init_state(xi[None])))(x)
    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, state))
    return x


def generate(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    negative_prompts: list[str] | None = None,
    num_steps: int = 50,
    guidance: float = 7.5,
    sampler: str = "ddim",
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    latents: jax.Array | None = None,
    unet_params: dict | None = None,
    lora: dict | None = None,
    adapter: tuple[dict, float] | None = None,
    user_embeddings: jax.Array | None = None,
    original_size: tuple[int, int] | None = None,
    crop_coords: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    return_latents: bool = False,
) -> np.ndarray:
    """Generates one image per prompt.

    Args:
      prompts, seeds: one seed per prompt (initial noise and sampler noise of that image).
      negative_prompts: per-prompt negative prompts; None = "" (SDXL: zero embeddings when the
        pipeline sets force_zeros_for_empty_prompt, as diffusers does).
      sampler: a name of `safealign_jax.schedulers.SAMPLER_NAMES`.
      height, width: image size in pixels (default: the UNet's sample_size x VAE factor).
      latents: (B, h, w, C) initial N(0, I) latents instead of the seeded ones.
      unet_params: replaces the pipeline's UNet params (e.g. a folded LoRA or merged model).
      lora: a "lora" collection (`Trainable({"lora": tree}, {"lora": scale}).collections()["lora"]`).
      adapter: (PSA adapter tree, lambda) with `user_embeddings` (B, E).
      original_size, crop_coords, target_size: SDXL micro-conditioning (pixels).
    Returns:
      (B, H, W, 3) float32 images in [0, 1] (or the final latents if `return_latents`).
    """
    batch = len(prompts)
    check(len(seeds) == batch, f"got {len(seeds)} seeds for {batch} prompts.")
    if negative_prompts is not None:
        check(len(negative_prompts) == batch, f"got {len(negative_prompts)} negative prompts for {batch} prompts.")
    factor = pipe.vae_scale
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    check(height % 8 == 0 and width % 8 == 0, f"image size {height}x{width} must be a multiple of 8.")
    shape = (height // factor, width // factor, pipe.unet.config.in_channels)

    context, pooled = encode_prompts(pipe, prompts)
    zero_negative = negative_prompts is None and pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
    if zero_negative:
        neg_context, neg_pooled = jnp.zeros_like(context), None if pooled is None else jnp.zeros_like(pooled)
    else:
        neg_context, neg_pooled = encode_prompts(pipe, negative_prompts or [""] * batch)
    context = jnp.concatenate([neg_context, context])
    added = None
    if pipe.is_sdxl:
        added = {
            "text_embeds": jnp.concatenate([neg_pooled, pooled]),
            "time_ids": jnp.asarray(sdxl_time_ids(2 * batch, height, width, crop=crop_coords, original=original_size,
                                                  target=target_size)),
        }

    variables = {"params": unet_params if unet_params is not None else pipe.unet_params}
    if lora is not None:
        variables["lora"] = lora
    user_tokens = None
    if adapter is not None:
        if user_embeddings is None:
            raise UserError("a PSA adapter needs user_embeddings (one per prompt).")
        tree, scale = adapter
        embeddings = jnp.asarray(user_embeddings, jnp.float32)
        check(embeddings.shape[0] == batch, f"got {embeddings.shape[0]} user embeddings for {batch} prompts.")
        user = Trainable({"adapter": tree}, {"adapter": scale})
        variables.update(user.collections())
        user_tokens = user.user_tokens(jnp.concatenate([jnp.zeros_like(embeddings), embeddings]))

    if latents is None:
        latents = initial_noise(seeds, shape)
    check(tuple(latents.shape) == (batch, *shape), f"latents have shape {tuple(latents.shape)}, expected {(batch, *shape)}.")
    keys = jnp.stack([jax.random.fold_in(jax.random.key(int(s)), 1) for s in seeds])
    sampler_obj = make_sampler(sampler, pipe.scheduler, num_steps)
    latents, context, added, user_tokens, keys = shard_batch(
        (jnp.asarray(latents, jnp.float32), context, added, user_tokens, keys), batch
    )
    out = _denoise(
        pipe.unet,
        sampler_obj, variables, latents, context, added, user_tokens,
        keys, jnp.float32(guidance), jnp.float32(guidance_rescale),
    )
    if return_latents:
        return np.asarray(out)
    return decode_latents(pipe, out)


def shard_batch(tree, batch: int):
    """Places arrays with a leading batch axis (`batch` or 2 * `batch` rows) across all devices.

    With one device, or a batch that does not divide by the device count, arrays stay as they
    are; otherwise the compiled loop runs data-parallel over a 1-D "data" mesh.
    """
    devices = jax.devices()
    if len(devices) == 1 or batch % len(devices):
        return tree
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    return jax.tree.map(lambda x: jax.device_put(x, rows), tree)


def decode_latents(pipe: Pipeline, latents: jax.Array) -> np.ndarray:
    """UNet latents (B, h, w, C) -> images (B, H, W, 3) float32 in [0, 1]."""
    images = _decode(pipe.vae, pipe.vae_params, pipe.vae.config.latents_for_decoder(latents))
    return np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0))


@partial(jax.jit, static_argnums=0)
def _decode(vae, params, z):
    return vae.apply({"params": params}, z, method="decode")


def pipeline_summary(pipe: Pipeline) -> str:
    """A one-line JSON description of the loaded pipeline."""
    return json.dumps({
        "family": "sdxl" if pipe.is_sdxl else "sd",
        "unet_blocks": list(pipe.unet.config.block_out_channels),
        "scheduler": pipe.scheduler.class_name,
    })
