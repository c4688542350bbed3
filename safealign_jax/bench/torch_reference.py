"""The PyTorch side of scripts/benchmark.py (torch, diffusers, peft, transformers imported inside
the functions: importing this module imports none of them).

Random weights at a benchmark config's sizes are built by diffusers and saved (`build_models`),
so our `load_unet` reads the same files. The reference train step is the official Diffusion-DPO
script's: diffusers UNet + peft LoRA (r = alpha on TARGETS), policy forward on [w; l], reference
forward with the adapters disabled under no_grad, backward, clip 1.0, AdamW; SDPA attention,
bf16 autocast when the benchmark computes in bf16 on a GPU; TF32 off for fp32 on a GPU.
"""

import contextlib
import json
import os
import platform
import shutil
import time

import numpy as np

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def _cfg(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def is_sdxl(unet_config: dict) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def _write_tokenizer(folder: str, max_length: int) -> None:
    """An offline byte-level CLIP tokenizer: 256 byte symbols, the same with "</w>", then
    <|startoftext|> (512) and <|endoftext|> (513)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = [], 0
    for b in range(256):
        symbols.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length}, f)


def build_models(config, workdir: str) -> str:
    """Saves the random UNet (inside a whole pipeline when sampling is enabled) to workdir/models."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(config.seed)
    folder = os.path.join(workdir, "models")
    shutil.rmtree(folder, ignore_errors=True)
    unet_config = _cfg(config.unet)
    unet = UNet2DConditionModel(**unet_config)
    if not config.sampling.enabled:
        unet.save_pretrained(folder)
        return folder
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tokenizer_dir = os.path.join(workdir, "tokenizer_src")
    _write_tokenizer(tokenizer_dir, 77)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
               pad_token_id=513)
    text = CLIPTextModel(CLIPTextConfig(**_cfg(config.sampling.text), **ids))
    vae = AutoencoderKL(**_cfg(config.sampling.vae))
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if is_sdxl(unet_config):
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_cfg(config.sampling.text_2), **ids))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_tf32():
    """TF32 off for torch's matmuls and convolutions (fp32 means fp32 on both sides)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def dpo_loss(forward, unet, batch, noise, t, alphas_cumprod, beta, autocast):
    """The official Diffusion-DPO loss: policy on [w; l], reference with the adapters disabled
    under no_grad; returns (loss, (policy_w, policy_l, ref_w, ref_l) mean errors)."""
    import torch
    import torch.nn.functional as F

    x0 = torch.cat([batch["x_w"], batch["x_l"]])
    noise, t = torch.cat([noise, noise]), torch.cat([t, t])
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    context = torch.cat([batch["context"], batch["context"]])
    added = {k: torch.cat([v, v]) for k, v in batch["added"].items()} if "added" in batch else None

    def predict():
        with autocast():
            return forward(noisy, t, context, added_cond_kwargs=added).sample

    errors = lambda pred: ((pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3)).chunk(2)  # noqa: E731
    policy_w, policy_l = errors(predict())
    with torch.no_grad():
        unet.disable_adapters()
        ref_w, ref_l = errors(predict())
        unet.enable_adapters()
    inside = -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), (policy_w, policy_l, ref_w, ref_l)


class TorchTrain:
    """The reference train step (eager, or torch.compile(unet) with `compiled`), built and warmed
    up on construction; `run()` times one repeat of config.steps_per_repeat steps."""

    def __init__(self, config, workdir: str, inputs: dict, lora_flat: dict, compiled: bool = False):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        from safealign_jax.models.load import DIFFUSERS_NAMES

        self.config, self.dev = config, device()
        sub = "unet" if os.path.isdir(os.path.join(workdir, "models", "unet")) else None
        unet = UNet2DConditionModel.from_pretrained(os.path.join(workdir, "models"), subfolder=sub)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                    init_lora_weights="gaussian", target_modules=TARGETS))
        with torch.no_grad():
            for path, leaf in lora_flat.items():
                name = DIFFUSERS_NAMES.torch_name((*path[:-1], "kernel")).removesuffix(".weight")
                weight = unet.get_submodule(f"{name}.lora_{path[-1].upper()}.default").weight
                weight.copy_(torch.from_numpy(np.ascontiguousarray(leaf.T)))
        if config.remat_policy != "none":
            unet.enable_gradient_checkpointing()
        self.unet = unet.to(self.dev).train()
        nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.dev)  # noqa: E731
        self.batch = {"x_w": nchw(inputs["latents_w"]), "x_l": nchw(inputs["latents_l"]),
                      "context": torch.from_numpy(inputs["encoder_hidden_states"]).to(self.dev)}
        if "text_embeds" in inputs:
            self.batch["added"] = {k: torch.from_numpy(inputs[k]).to(self.dev) for k in ("text_embeds", "time_ids")}
        self.alphas_cumprod = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(self.dev)
        bf16 = self.dev.type == "cuda" and config.compute_dtype == "bfloat16"
        self.autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.precision = contextlib.nullcontext if bf16 else no_tf32
        self.info = {"device": torch.cuda.get_device_name() if self.dev.type == "cuda"
                     else platform.processor() or "cpu", "autocast": "bf16" if bf16 else "none",
                     "threads": torch.get_num_threads()}
        if config.parity and not compiled:
            self.info["parity"] = self.parity(workdir)
            self.info["flops_counter"] = self.flop_count()
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=1e-2)
        self.forward = torch.compile(self.unet) if compiled else self.unet
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self._steps(config.warmup)
        self.info["warmup_s"] = time.perf_counter() - start

    def _steps(self, n: int) -> None:
        import torch

        with self.precision():
            for _ in range(n):
                noise = torch.randn_like(self.batch["x_w"])
                t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (noise.shape[0],), device=self.dev)
                loss, _ = dpo_loss(self.forward, self.unet, self.batch, noise, t, self.alphas_cumprod,
                                   self.config.beta, self.autocast)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        _sync(self.dev)

    def run(self) -> float:
        """Seconds per step of one repeat."""
        start = time.perf_counter()
        self._steps(self.config.steps_per_repeat)
        return (time.perf_counter() - start) / self.config.steps_per_repeat

    def report(self) -> dict:
        import torch

        return {**self.info, "peak_memory_bytes": torch.cuda.max_memory_allocated()
                if self.dev.type == "cuda" else None}

    def parity(self, workdir: str) -> dict:
        """The fp32 loss on the noise and timesteps our side drew (workdir/parity.npz), TF32 off."""
        import torch

        data = np.load(os.path.join(workdir, "parity.npz"))
        noise = torch.from_numpy(np.ascontiguousarray(data["noise"].transpose(0, 3, 1, 2))).to(self.dev)
        t = torch.from_numpy(data["t"].astype(np.int64)).to(self.dev)
        with no_tf32(), torch.no_grad():
            loss, errors = dpo_loss(self.unet, self.unet, self.batch, noise, t, self.alphas_cumprod,
                                    self.config.parity_beta, contextlib.nullcontext)
        names = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
        return {"loss": float(loss), **{k: float(v.mean()) for k, v in zip(names, errors, strict=True)}}

    def flop_count(self) -> int | None:
        """torch.utils.flop_counter's count of one loss forward + backward (no optimizer)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        noise = torch.randn_like(self.batch["x_w"])
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (noise.shape[0],), device=self.dev)
        try:
            with FlopCounterMode(display=False) as counter:
                loss, _ = dpo_loss(self.unet, self.unet, self.batch, noise, t, self.alphas_cumprod,
                                   self.config.beta, self.autocast)
                loss.backward()
        except Exception:  # the counter is a cross-check only
            return None
        self.unet.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


class DiffusersSample:
    """diffusers' pipeline (DDIM, classifier-free guidance, VAE decode); `run()` times one call."""

    def __init__(self, config, workdir: str, prompts: list[str], size: int):
        import torch
        from diffusers import DiffusionPipeline

        self.dev = device()
        bf16 = self.dev.type == "cuda" and config.compute_dtype == "bfloat16"
        pipe = DiffusionPipeline.from_pretrained(os.path.join(workdir, "models"),
                                                 torch_dtype=torch.bfloat16 if bf16 else torch.float32)
        self.pipe = pipe.to(self.dev)
        self.pipe.set_progress_bar_config(disable=True)
        self.config, self.prompts, self.size = config, prompts, size
        self.precision = contextlib.nullcontext if bf16 else no_tf32
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.images = self._call()
        self.info = {"first_call_s": time.perf_counter() - start, "dtype": "bfloat16" if bf16 else "float32"}

    def _call(self):
        with self.precision():
            images = self.pipe(self.prompts, num_inference_steps=self.config.sampling.steps,
                               guidance_scale=self.config.sampling.guidance, height=self.size,
                               width=self.size, output_type="np").images
        _sync(self.dev)
        return images

    def run(self) -> float:
        start = time.perf_counter()
        self.images = self._call()
        return time.perf_counter() - start

    def report(self) -> dict:
        import torch

        return {**self.info, "finite": bool(np.isfinite(self.images).all()),
                "peak_memory_bytes": torch.cuda.max_memory_allocated() if self.dev.type == "cuda" else None}
