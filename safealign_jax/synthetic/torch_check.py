"""The demo's PyTorch check: the exported files loaded by diffusers give our outputs.

Imports torch / diffusers inside the function (the torch extra); the world's pipeline has a
pixel-space stand-in VAE, so the check is at the UNet: `UNet2DConditionModel.from_pretrained`
of the base `unet/`, the peft LoRA file through `load_lora_adapter`, the IP-Adapter file through
diffusers' IP-Adapter loader, user embeddings as `image_embeds`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from safealign_jax.trainable import Trainable


def compare_with_diffusers(folder: str, params: dict, tree: dict, rank: int, psa, lora_file: str,
                           adapter_file: str) -> dict:
    """Max |ours - diffusers| / max |diffusers| for the LoRA and for the adapter, on random inputs."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    from safealign_jax.models import load_unet

    module, params = load_unet(folder)
    cfg = module.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg.sample_size, cfg.sample_size, cfg.in_channels), np.float32)
    t = np.array([50, 700])
    context = rng.standard_normal((2, 16, cfg.cross_attention_dim), np.float32)
    embeds = rng.standard_normal((2, psa.adapter["proj"]["kernel"].shape[0]), np.float32)

    def torch_out(unet, **kwargs):
        with torch.no_grad():
            out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context), **kwargs)
        return out.sample.permute(0, 2, 3, 1).numpy()

    def relative(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    unet.load_lora_adapter(lora_file, prefix="unet", adapter_name="comerge")
    ours = np.asarray(module.apply({"params": params, **Trainable({"lora": tree}).collections()}, x, t, context))
    lora_error = relative(ours, torch_out(unet))

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    flat = load_file(adapter_file)
    state = {"image_proj": {k[len("image_proj."):]: torch.from_numpy(v) for k, v in flat.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[len("ip_adapter."):]: torch.from_numpy(v) for k, v in flat.items() if k.startswith("ip_adapter.")}}
    unet._load_ip_adapter_weights([state])
    theirs = torch_out(unet, added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)[:, None]]})
    user = Trainable({"adapter": psa.adapter})
    ours = np.asarray(module.apply({"params": params, **user.collections()}, x, t, context,
                                   user_tokens=user.user_tokens(jnp.asarray(embeds))))
    return {"lora_relative_error": lora_error, "ip_adapter_relative_error": relative(ours, theirs),
            "rank": rank, "tolerance": 1e-4}
