"""Side-by-side benchmark against the PyTorch reference (issue #11): one Diffusion-DPO LoRA step
and sampling throughput, on the same device, UNet config, batch and LoRA targets.

    python scripts/benchmark.py --config configs/benchmark.py:tiny --workdir runs/bench

Ours: the trainer's pieces (`make_train_step`, `objective.make_loss_fn`, `init_state`,
`compile_step`: AOT-compiled, donated state), LoRA fp32 with an fp32 or bf16 UNet. Theirs:
diffusers UNet2DConditionModel + peft LoRA as the official Diffusion-DPO script runs it (policy
forward on [w; l], reference forward with the adapters disabled under no_grad, backward, clip,
AdamW), SDPA attention, bf16 autocast on GPU, eager and torch.compile. Sampling: our
`pipeline.generate` vs diffusers' pipeline (DDIM, classifier-free guidance, VAE decode).

Weights are random at the configs of configs/benchmark.py (nothing is downloaded): diffusers
builds the UNet (and the pipeline), saves it, and our `load_unet` reads the same files. Each
phase (peak, jax_train, torch_train, jax_sample, torch_sample) runs in its own process unless
`isolate=False`. Warm-up steps are excluded; times are medians of repeats. Writes
workdir/benchmark.json (every repeat included) and prints a markdown table.

FLOPs: `model` = 6 UNet forwards per pair (policy forward on w and l: 2, its backward on w and l:
2, as the base weights are frozen the backward computes input gradients only, about one forward;
reference forward on w and l: 2; remat "full" adds 2 recomputed forwards, not counted); one UNet
forward = the multiply-adds of every convolution and matmul in its jaxpr x 2. `jaxpr` = the same
count over the whole traced step; `xla` = the compiled step's cost_analysis. MFU = model FLOP/s
over the device's peak measured in the same run (a jitted n x n matmul, bf16 on GPU, fp32 on CPU).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the device

import datetime
import importlib.util
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=NUM_TRAIN_TIMESTEPS)
LORA_B_STD = 1e-3  # the LoRA's b (zero at init) is drawn so that policy != reference


# --- shared helpers -------------------------------------------------------------------------


def _median_time(fn, repeats: int, per: int) -> tuple[float, list[float]]:
    """Median seconds per unit over `repeats` calls of fn() (each doing `per` units)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / per)
    return statistics.median(times), times


def _rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cfg(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _sdxl(unet_config: dict) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def _pooled_dim(unet_config: dict) -> int:
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]


# --- setup: random weights saved by diffusers, shared inputs ---------------------------------


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
    """Saves the random UNet (inside a whole pipeline when sampling is enabled); returns the
    folder `load_unet` / `from_pretrained` read."""
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
    if _sdxl(unet_config):
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


def make_inputs(config, workdir: str, folder: str) -> None:
    """workdir/inputs.npz: the batch (NHWC latents, text states, SDXL added conditions) and the
    LoRA tree ("lora/<flax path>/a|b"), fp32, the same for both sides."""
    import jax

    from safealign_jax import lora
    from safealign_jax.convert.checkpoint import read_config
    from safealign_jax.models import UNet2DConditionModel, UNetConfig
    from safealign_jax.models.load import abstract_params, component_folder

    unet_dir = component_folder(folder, "unet")
    unet_config = UNetConfig.from_diffusers(read_config(unet_dir), unet_dir)
    module = UNet2DConditionModel(unet_config)
    shapes = abstract_params(module, *module.dummy_inputs(size=2**unet_config.num_upsamplers, seq_len=1))
    rank = config.lora_rank
    tree = lora.init(jax.random.key(config.seed), shapes, lora.LoRAConfig(rank=rank, alpha=rank))
    rng = np.random.default_rng(config.seed)
    b, size, c = config.pairs, config.resolution // 8, unet_config.in_channels
    arrays = {
        "latents_w": rng.standard_normal((b, size, size, c), np.float32),
        "latents_l": rng.standard_normal((b, size, size, c), np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (b, config.seq_len, unet_config.cross_attention_dim), np.float32),
    }
    if _sdxl(_cfg(config.unet)):
        arrays["text_embeds"] = rng.standard_normal((b, _pooled_dim(_cfg(config.unet))), np.float32)
        res = float(config.resolution)
        arrays["time_ids"] = np.tile(np.array([res, res, 0, 0, res, res], np.float32), (b, 1))
    from flax import traverse_util

    for path, leaf in traverse_util.flatten_dict(tree).items():
        value = np.asarray(leaf)
        if path[-1] == "b":
            value = rng.standard_normal(value.shape).astype(np.float32) * LORA_B_STD
        arrays["lora/" + "/".join(path)] = value
    np.savez(os.path.join(workdir, "inputs.npz"), **arrays)


def _load_inputs(workdir: str) -> tuple[dict, dict]:
    """(batch arrays, flat LoRA {flax path tuple: array}) from workdir/inputs.npz."""
    data = dict(np.load(os.path.join(workdir, "inputs.npz")))
    flat = {tuple(k.split("/")[1:]): v for k, v in data.items() if k.startswith("lora/")}
    batch = {k: v for k, v in data.items() if not k.startswith("lora/")}
    return batch, flat


# --- FLOP counting from jaxprs ---------------------------------------------------------------


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and conv_general_dilated in `jaxpr` and its
    sub-jaxprs (elementwise work, softmax and norms are not counted)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            per_output = rhs[spec[1]] * int(np.prod([rhs[i] for i in spec[2:]]))
            total += 2 * int(np.prod(out)) * per_output
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += matmul_flops(inner)
    return total


# --- phase: the device's matmul peak ---------------------------------------------------------


def phase_peak(config, workdir: str) -> dict:
    """Median TFLOP/s of a jitted n x n x n matmul (bf16 on GPU / TPU, fp32 on CPU)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    n = config.peak_matmul_size
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    matmul(a, b).block_until_ready()
    seconds, _ = _median_time(lambda: matmul(a, b).block_until_ready(), 7, 1)
    return {"tflops": 2 * n**3 / seconds / 1e12, "dtype": jnp.dtype(dtype).name, "n": n,
            "device": f"{device.platform}: {device.device_kind}"}


# --- phase: our train step --------------------------------------------------------------------


def _train_config(config):
    """The trainer's config (configs/train.py) with the benchmark's optimiser settings."""
    spec = importlib.util.spec_from_file_location("train_config", os.path.join(REPO, "configs", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("sd15")
    c.optim.learning_rate, c.optim.scale_lr_by_pairs, c.optim.warmup_steps = config.learning_rate, False, 0
    return c


def _device_memory(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def phase_jax_train(config, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from jax.sharding import Mesh

    from safealign_jax import dpo, lora
    from safealign_jax.models import load_unet
    from safealign_jax.models.attention import attention_implementation
    from safealign_jax.train import mesh as mesh_lib
    from safealign_jax.train import objective
    from safealign_jax.train import state as state_lib
    from safealign_jax.train.step import compile_step, make_train_step

    arrays, flat = _load_inputs(workdir)
    folder = os.path.join(workdir, "models")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]
    module, params = load_unet(folder, dtype=dtype, remat_policy=config.remat_policy)
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]).reshape(1, 1), mesh_lib.AXES)
    replicated = mesh_lib.replicated(mesh)
    batch = {k: arrays[k] for k in ("latents_w", "latents_l", "encoder_hidden_states")}
    if "text_embeds" in arrays:
        batch["added_cond"] = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    tree = traverse_util.unflatten_dict(flat)
    scale = 1.0  # alpha = rank
    train_config = _train_config(config)
    optimizer = state_lib.make_optimizer(train_config, config.pairs)
    state = state_lib.init_state({"lora": tree}, optimizer, config.seed)
    state_sh = mesh_lib.replicated_like(state, mesh)
    params_sh = mesh_lib.param_shardings(params, mesh, train_config)
    params = mesh_lib.put_global(params, params_sh)
    batch_sh = mesh_lib.batch_sharding(mesh)
    batch = mesh_lib.put_global(batch, jax.tree.map(lambda _: batch_sh, batch))
    state = mesh_lib.put_global(state, state_sh)
    empty = mesh_lib.put_global(
        np.zeros(arrays["encoder_hidden_states"].shape[1:], np.float32), replicated)
    schedule = objective.training_schedule("", "epsilon")
    loss_fn = objective.make_loss_fn(module, scale, schedule, config.beta)
    step_fn = make_train_step(loss_fn, optimizer, 0.0)

    start = time.perf_counter()
    with attention_implementation(config.attention):
        compiled = compile_step(step_fn, state, state_sh, params, params_sh, batch, batch_sh, empty,
                                replicated)
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    with attention_implementation(config.attention):
        step_jaxpr = jax.make_jaxpr(step_fn)(state, params, batch, empty)
        inputs = module.dummy_inputs(batch=1, size=config.resolution // 8, seq_len=config.seq_len)
        forward_jaxpr = jax.make_jaxpr(module.apply)({"params": params}, *inputs)

    holder = {"state": state}

    def run(steps):
        for _ in range(steps):
            holder["state"], metrics = compiled(holder["state"], params, batch, empty)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    start = time.perf_counter()
    run(config.warmup)
    warmup_s = time.perf_counter() - start
    seconds, times = _median_time(lambda: run(config.steps_per_repeat), config.repeats,
                                  config.steps_per_repeat)
    result = {
        "step_s": seconds, "step_s_repeats": times, "compile_s": compile_s, "warmup_s": warmup_s,
        "flops_xla": float(cost.get("flops", 0.0)) if cost else None,
        "flops_jaxpr": matmul_flops(step_jaxpr.jaxpr),
        "unet_forward_flops": matmul_flops(forward_jaxpr.jaxpr),
        "peak_memory_bytes": _device_memory(device),
        "compiled_memory_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        if memory else None,
        "peak_rss_bytes": _rss_bytes(),
        "device": f"{device.platform}: {device.device_kind}",
    }
    if config.parity:
        result["parity"] = _jax_parity(config, workdir, folder, tree, arrays, schedule, dpo, lora)
    return result


def _jax_parity(config, workdir, folder, tree, arrays, schedule, dpo, lora) -> dict:
    """The fp32 loss of our `diffusion_dpo_loss` (highest matmul precision); saves the noise and
    timesteps it drew to workdir/parity.npz for the torch side."""
    import jax

    from safealign_jax.models import load_unet

    module, params = load_unet(folder)
    batch = {k: arrays[k] for k in ("latents_w", "latents_l", "encoder_hidden_states")}
    if "text_embeds" in arrays:
        batch["added_cond"] = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    key = jax.random.key(config.seed + 1)

    def loss(tree, params, batch):
        collections = {"lora": lora.variables(tree, 1.0)}
        return dpo.diffusion_dpo_loss(module.apply, params, collections, batch, schedule, key,
                                      config.parity_beta)

    with jax.default_matmul_precision("highest"):
        value, metrics = jax.jit(loss)(tree, params, batch)
        noise, t = jax.jit(lambda: dpo._draw(key, batch["latents_w"].shape, NUM_TRAIN_TIMESTEPS))()
    np.savez(os.path.join(workdir, "parity.npz"), noise=np.asarray(noise), t=np.asarray(t))
    names = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
    return {"loss": float(value), **{k: float(metrics[k]) for k in names}}


# --- phase: the PyTorch reference step --------------------------------------------------------


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_unet(config, workdir: str, flat: dict):
    """diffusers UNet + peft LoRA (r = alpha, TARGETS) holding our LoRA values; base frozen."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from safealign_jax.models.load import DIFFUSERS_NAMES

    unet = UNet2DConditionModel.from_pretrained(os.path.join(workdir, "models"), subfolder=_sub(workdir))
    unet.requires_grad_(False)
    rank = config.lora_rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    with torch.no_grad():
        for path, leaf in flat.items():
            name = DIFFUSERS_NAMES.torch_name((*path[:-1], "kernel")).removesuffix(".weight")
            weight = unet.get_submodule(f"{name}.lora_{path[-1].upper()}.default").weight
            weight.copy_(torch.from_numpy(np.ascontiguousarray(leaf.T)))
    if config.remat_policy != "none":
        unet.enable_gradient_checkpointing()
    return unet.to(_torch_device()).train()


def _sub(workdir: str) -> str | None:
    return "unet" if os.path.isdir(os.path.join(workdir, "models", "unet")) else None


def _torch_batch(arrays: dict, device) -> dict:
    import torch

    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)  # noqa: E731
    batch = {"x_w": nchw(arrays["latents_w"]), "x_l": nchw(arrays["latents_l"]),
             "context": torch.from_numpy(arrays["encoder_hidden_states"]).to(device)}
    if "text_embeds" in arrays:
        batch["added"] = {k: torch.from_numpy(arrays[k]).to(device) for k in ("text_embeds", "time_ids")}
    return batch


def torch_dpo_loss(forward, unet, batch, noise, t, alphas_cumprod, beta, autocast):
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def phase_torch_train(config, workdir: str) -> dict:
    import contextlib

    import torch
    from diffusers import DDPMScheduler

    device = _torch_device()
    arrays, flat = _load_inputs(workdir)
    batch = _torch_batch(arrays, device)
    unet = _torch_unet(config, workdir, flat)
    alphas_cumprod = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(device)
    bf16 = device.type == "cuda" and config.compute_dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else contextlib.nullcontext
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
              or "cpu", "autocast": "bf16" if bf16 else "none"}
    if config.parity:
        result["parity"] = _torch_parity(config, workdir, unet, batch, alphas_cumprod)

    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-2)
    variants = [("eager", unet)]
    if config.torch_compile:
        variants.append(("compile", torch.compile(unet)))
    for name, forward in variants:
        def step(forward=forward):
            noise = torch.randn_like(batch["x_w"])
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (noise.shape[0],), device=device)
            loss, _ = torch_dpo_loss(forward, unet, batch, noise, t, alphas_cumprod, config.beta, autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def run(steps, step=step):
            for _ in range(steps):
                step()
            _sync(device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            run(config.warmup)
            warmup_s = time.perf_counter() - start
            seconds, times = _median_time(lambda run=run: run(config.steps_per_repeat),
                                          config.repeats, config.steps_per_repeat)
        except Exception as e:  # torch.compile fails on some devices / toolchains: report why
            result[name] = {"n/a": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
            continue
        result[name] = {"step_s": seconds, "step_s_repeats": times, "warmup_s": warmup_s,
                        "peak_memory_bytes": torch.cuda.max_memory_allocated()
                        if device.type == "cuda" else None,
                        "peak_rss_bytes": _rss_bytes()}
    result["flops_counter"] = _torch_flops(config, unet, batch, alphas_cumprod, autocast)
    return result


def _torch_parity(config, workdir, unet, batch, alphas_cumprod) -> dict:
    """The fp32 loss on the noise and timesteps our side drew (TF32 off)."""
    import contextlib

    import torch

    data = np.load(os.path.join(workdir, "parity.npz"))
    device = batch["x_w"].device
    noise = torch.from_numpy(np.ascontiguousarray(data["noise"].transpose(0, 3, 1, 2))).to(device)
    t = torch.from_numpy(data["t"].astype(np.int64)).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            loss, errors = torch_dpo_loss(unet, unet, batch, noise, t, alphas_cumprod,
                                          config.parity_beta, contextlib.nullcontext)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    names = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
    return {"loss": float(loss), **{k: float(v.mean()) for k, v in zip(names, errors, strict=True)}}


def _torch_flops(config, unet, batch, alphas_cumprod, autocast) -> int | None:
    """torch.utils.flop_counter's count of one loss forward + backward (no optimizer)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    noise = torch.randn_like(batch["x_w"])
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (noise.shape[0],), device=noise.device)
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _ = torch_dpo_loss(unet, unet, batch, noise, t, alphas_cumprod, config.beta, autocast)
            loss.backward()
    except Exception:  # the counter is a cross-check only
        return None
    unet.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# --- phases: sampling -------------------------------------------------------------------------


def _prompts(config) -> list[str]:
    return [f"a photo of a cat number {i}" for i in range(config.sampling.batch)]


def _image_size(config) -> int:
    """Pixels of the sampled images: the training latents' size times the VAE's factor."""
    return config.resolution // 8 * 2 ** (len(config.sampling.vae.block_out_channels) - 1)


def phase_jax_sample(config, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp

    from safealign_jax.models.attention import attention_implementation
    from safealign_jax.pipeline import generate, load_pipeline

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]
    pipe = load_pipeline(os.path.join(workdir, "models"), dtype=dtype)
    prompts, seeds, size = _prompts(config), list(range(config.sampling.batch)), _image_size(config)

    def run():
        return generate(pipe, prompts, seeds, num_steps=config.sampling.steps,
                        guidance=config.sampling.guidance, sampler="ddim", height=size, width=size)

    with attention_implementation(config.attention):
        start = time.perf_counter()
        images = run()
        first_s = time.perf_counter() - start
        seconds, times = _median_time(run, config.sampling.repeats, 1)
    device = jax.devices()[0]
    return {"images_per_s": config.sampling.batch / seconds, "call_s": seconds, "call_s_repeats": times,
            "first_call_s": first_s, "finite": bool(np.isfinite(images).all()),
            "peak_memory_bytes": _device_memory(device), "peak_rss_bytes": _rss_bytes()}


def phase_torch_sample(config, workdir: str) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    device = _torch_device()
    bf16 = device.type == "cuda" and config.compute_dtype == "bfloat16"
    pipe = DiffusionPipeline.from_pretrained(os.path.join(workdir, "models"),
                                             torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts, size = _prompts(config), _image_size(config)

    def run():
        images = pipe(prompts, num_inference_steps=config.sampling.steps,
                      guidance_scale=config.sampling.guidance, height=size, width=size,
                      output_type="np").images
        _sync(device)
        return images

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = run()
    first_s = time.perf_counter() - start
    seconds, times = _median_time(run, config.sampling.repeats, 1)
    return {"images_per_s": config.sampling.batch / seconds, "call_s": seconds, "call_s_repeats": times,
            "first_call_s": first_s, "finite": bool(np.isfinite(images).all()),
            "dtype": "bfloat16" if bf16 else "float32",
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "peak_rss_bytes": _rss_bytes()}


PHASES = {"peak": phase_peak, "jax_train": phase_jax_train, "torch_train": phase_torch_train,
          "jax_sample": phase_jax_sample, "torch_sample": phase_torch_sample}


def _run_phase(config, workdir: str, name: str) -> dict:
    """One phase, in this process or (config.isolate) in a fresh one."""
    if not config.isolate:
        return PHASES[name](config, workdir)
    out = os.path.join(workdir, f"phase_{name}.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", name, workdir], check=True)
    with open(out) as f:
        return json.load(f)


def _child(name: str, workdir: str) -> None:
    import ml_collections

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    result = PHASES[name](config, workdir)
    with open(os.path.join(workdir, f"phase_{name}.json"), "w") as f:
        json.dump(result, f)


# --- report -----------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "peft", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def assemble(config, results: dict, command: str) -> dict:
    """The JSON report: inputs, per-side figures, FLOPs, MFU, ratios and parity."""
    peak, ours, theirs = results["peak"], results["jax_train"], results["torch_train"]
    pairs = config.pairs
    model_flops = 6 * pairs * ours["unet_forward_flops"]
    peak_flops = peak["tflops"] * 1e12
    train = {}
    for name, entry in (("jax", ours), ("torch_eager", theirs.get("eager")),
                        ("torch_compile", theirs.get("compile", {"n/a": "disabled (torch_compile=False)"}))):
        if not entry or "step_s" not in entry:
            train[name] = entry
            continue
        tflops = model_flops / entry["step_s"] / 1e12
        train[name] = {**entry, "pairs_per_s": pairs / entry["step_s"], "model_tflops": tflops,
                       "mfu": tflops * 1e12 / peak_flops}
    ratios = {f"{name}_over_jax_step_time": train[name]["step_s"] / ours["step_s"]
              for name in ("torch_eager", "torch_compile") if "step_s" in (train[name] or {})}
    report = {
        "preset": config.preset,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "device": {"jax": ours["device"], "torch": theirs["device"], "cpu": _cpu_name(),
                   "cpu_count": os.cpu_count()},
        "versions": _versions(),
        "setup": {"unet": _cfg(config.unet), "resolution": config.resolution, "pairs": pairs,
                  "seq_len": config.seq_len, "compute_dtype": config.compute_dtype,
                  "torch_autocast": theirs["autocast"], "remat_policy": config.remat_policy,
                  "attention": config.attention or "default (XLA)",
                  "lora": {"rank": config.lora_rank, "alpha": config.lora_rank, "targets": TARGETS},
                  "warmup_steps": config.warmup, "repeats": config.repeats,
                  "steps_per_repeat": config.steps_per_repeat, "isolated_processes": config.isolate},
        "peak_matmul": peak,
        "flops": {"unet_forward": ours["unet_forward_flops"], "model_per_step": model_flops,
                  "jaxpr_per_step": ours["flops_jaxpr"], "xla_per_step": ours["flops_xla"],
                  "torch_counter_per_step": theirs.get("flops_counter"),
                  "model_rule": "6 UNet forwards per pair: policy fwd w+l (2) + policy bwd, input "
                                "gradients only (2) + reference fwd w+l (2); matmul/conv MACs x 2"},
        "train": train,
        "ratios": ratios,
    }
    if config.parity:
        a, b = ours["parity"], theirs["parity"]
        report["parity"] = {"beta": config.parity_beta, "jax": a, "torch": b, "loss_rel_err": abs(a["loss"] - b["loss"]) / abs(b["loss"]),
                            "mse_rel_err": max(abs(a[k] - b[k]) / abs(b[k]) for k in a if k != "loss")}
    if config.sampling.enabled:
        js, ts = results["jax_sample"], results["torch_sample"]
        report["sampling"] = {"steps": config.sampling.steps, "guidance": config.sampling.guidance,
                              "batch": config.sampling.batch, "sampler": "DDIM", "jax": js, "diffusers": ts,
                              "diffusers_over_jax_time": ts["call_s"] / js["call_s"]}
    return report


def _fmt(value, scale=1.0, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}g}"


def table(report: dict) -> str:
    """The side-by-side table (markdown)."""
    train = report["train"]
    cols = [("ours (JAX)", train["jax"]), ("torch eager", train["torch_eager"]),
            ("torch.compile", train["torch_compile"])]
    mib = 1 / 2**20
    rows = [("train step, ms (median)", "step_s", 1e3), ("pairs/s", "pairs_per_s", 1),
            ("achieved TFLOP/s (model count)", "model_tflops", 1), ("MFU", "mfu", 1),
            ("peak device memory, MiB", "peak_memory_bytes", mib),
            ("peak process RSS, MiB", "peak_rss_bytes", mib), ("warm-up s", "warmup_s", 1)]
    lines = ["| | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, scale in rows:
        cells = []
        for _, entry in cols:
            if not entry or "n/a" in entry:
                cells.append("n/a" if entry else "-")
            else:
                cells.append(_fmt(entry.get(key), scale))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = [min(e["step_s_repeats"]) * 1e3 if e and "step_s_repeats" in e else None for _, e in cols]
    lines.insert(3, "| train step, ms (best repeat) | " + " | ".join(
        _fmt(b) if b is not None else "n/a" for b in best) + " |")
    ratio = report["ratios"]
    lines.append("| step time / ours | 1 | " + " | ".join(
        _fmt(ratio.get(f"{n}_over_jax_step_time")) for n in ("torch_eager", "torch_compile")) + " |")
    lines.append(f"| compile s (ours, AOT) | {_fmt(train['jax']['compile_s'])} | | |")
    lines.append(f"| XLA buffers of the compiled step, MiB | "
                 f"{_fmt(train['jax']['compiled_memory_bytes'], mib)} | | |")
    if "sampling" in report:
        s = report["sampling"]
        lines.append(f"| sampling images/s ({s['steps']} DDIM steps, CFG {s['guidance']}, batch "
                     f"{s['batch']}) | {_fmt(s['jax']['images_per_s'])} | "
                     f"{_fmt(s['diffusers']['images_per_s'])} (diffusers) | |")
        fastest = [s["batch"] / min(s[k]["call_s_repeats"]) for k in ("jax", "diffusers")]
        lines.append(f"| sampling images/s (best repeat) | {_fmt(fastest[0])} | {_fmt(fastest[1])} | |")
    f, peak = report["flops"], report["peak_matmul"]
    notes = [f"device peak ({peak['dtype']} {peak['n']}^3 matmul): {peak['tflops']:.3g} TFLOP/s",
             f"FLOPs per step: model {f['model_per_step']:.3e}, jaxpr {f['jaxpr_per_step']:.3e}, "
             f"XLA {_fmt(f['xla_per_step'])}, torch counter {_fmt(f['torch_counter_per_step'])}"]
    if "parity" in report:
        p = report["parity"]
        notes.append(f"fp32 parity: loss ours {p['jax']['loss']:.6g} vs torch {p['torch']['loss']:.6g} "
                     f"(rel err {p['loss_rel_err']:.1e}; per-image errors {p['mse_rel_err']:.1e})")
    for name in ("torch_compile", "torch_eager"):
        if train[name] and "n/a" in train[name]:
            notes.append(f"{name}: n/a ({train[name]['n/a']})")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(config, workdir: str, command: str = "") -> dict:
    """Runs every phase; writes workdir/benchmark.json and prints the table. Returns the report."""
    import jax

    from safealign_jax.errors import check

    check(config.attention in ("", "xla", "cudnn"),
          f"--config.attention={config.attention!r} is unknown (expected '', 'xla' or 'cudnn').")
    platform_name = jax.devices()[0].platform
    check(config.attention != "cudnn" or platform_name == "gpu",
          f"--config.attention=cudnn needs a GPU (this run's device is {platform_name}).")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    make_inputs(config, workdir, build_models(config, workdir))
    names = ["peak", "jax_train", "torch_train"]
    if config.sampling.enabled:
        names += ["jax_sample", "torch_sample"]
    results = {name: _run_phase(config, workdir, name) for name in names}
    report = assemble(config, results, command or " ".join(sys.argv))
    with open(os.path.join(workdir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(table(report))
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--phase"]:
        _child(sys.argv[2], sys.argv[3])
    else:
        from safealign_jax import cli

        CONFIG = cli.define_flags()
        cli.run(lambda config, workdir: main(config, workdir), CONFIG)
