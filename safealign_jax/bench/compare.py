"""The side-by-side benchmark of scripts/benchmark.py: our train step and sampler against the
PyTorch reference (`bench.torch_reference`) on the same device, weights, inputs and LoRA.

Ours is the trainer's step (`bench.build.build_train_step` of a training config derived from the
benchmark config: AOT-compiled, donated state, the config's dtypes, remat and attention).

Fairness: each side runs in its own worker process (`isolate`), pinned to the same CPUs (the
first `threads` CPUs of this process; torch gets that many threads, XLA sizes its pool from the
affinity); both are built and warmed up first, then the timed repeats alternate between the
sides (A B, B A, ...), so slow phases of a shared machine hit both alike. fp32 on a GPU means
fp32 on both sides: TF32 off in torch, "highest" matmul precision in JAX. Times are medians of
the repeats, every repeat is kept in the report.
"""

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import ml_collections
import numpy as np

from safealign_jax.bench import torch_reference

LORA_B_STD = 1e-3  # the LoRA's b (zero at init) is drawn so that policy != reference
SIDES_TRAIN = ("jax_train", "torch_eager", "torch_compile")
SIDES_SAMPLE = ("jax_sample", "diffusers_sample")


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_config(config, base: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`base` (configs/train.py) set to the benchmark's model folder, sizes, dtypes, remat,
    attention, LoRA, beta and optimiser (AdamW, constant lr, clip 1.0, no caption dropout)."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.model.path = os.path.join(workdir, "models")
    c.model.compute_dtype = c.model.param_dtype = config.compute_dtype
    c.model.remat_policy, c.model.attention = config.remat_policy, config.attention
    c.lora.rank, c.lora.alpha = config.lora_rank, float(config.lora_rank)
    c.dpo.beta, c.dpo.caption_dropout = config.beta, 0.0
    c.optim.name, c.optim.learning_rate, c.optim.scale_lr_by_pairs = "adamw", config.learning_rate, False
    c.optim.warmup_steps, c.optim.clip_norm, c.optim.grad_accum = 0, 1.0, 1
    c.train.pairs_per_device, c.seed = config.pairs, config.seed
    c.data.resolution, c.data.seq_len = config.resolution, config.seq_len
    return c


def make_inputs(config, workdir: str) -> None:
    """workdir/inputs.npz: the batch (NHWC latents, text states, SDXL added conditions) and the
    LoRA tree ("lora/<flax path>/a|b"), fp32, the same for both sides."""
    import jax
    from flax import traverse_util

    from safealign_jax import lora
    from safealign_jax.bench.memory import unet_structure
    from safealign_jax.models import UNet2DConditionModel
    from safealign_jax.models.embeddings import sdxl_time_ids
    from safealign_jax.models.load import abstract_params

    structure = unet_structure(ml_collections.ConfigDict({"model": {"path": os.path.join(workdir, "models")}}))
    module = UNet2DConditionModel(structure)
    shapes = abstract_params(module, *module.dummy_inputs(size=2**structure.num_upsamplers, seq_len=1))
    tree = lora.init(jax.random.key(config.seed), shapes, lora.LoRAConfig(rank=config.lora_rank,
                                                                          alpha=config.lora_rank))
    rng = np.random.default_rng(config.seed)
    b, size, c = config.pairs, config.resolution // 8, structure.in_channels
    arrays = {"latents_w": rng.standard_normal((b, size, size, c), np.float32),
              "latents_l": rng.standard_normal((b, size, size, c), np.float32),
              "encoder_hidden_states": rng.standard_normal((b, config.seq_len, structure.cross_attention_dim),
                                                           np.float32)}
    if structure.addition_embed_type == "text_time":
        pooled = structure.projection_class_embeddings_input_dim - 6 * structure.addition_time_embed_dim
        arrays["text_embeds"] = rng.standard_normal((b, pooled), np.float32)
        res = float(config.resolution)
        arrays["time_ids"] = sdxl_time_ids(b, res)
    for path, leaf in traverse_util.flatten_dict(tree).items():
        value = np.asarray(leaf)
        if path[-1] == "b":
            value = rng.standard_normal(value.shape).astype(np.float32) * LORA_B_STD
        arrays["lora/" + "/".join(path)] = value
    np.savez(os.path.join(workdir, "inputs.npz"), **arrays)


def load_inputs(workdir: str) -> tuple[dict, dict]:
    """(batch arrays, flat LoRA {flax path tuple: array}) from workdir/inputs.npz."""
    data = dict(np.load(os.path.join(workdir, "inputs.npz")))
    flat = {tuple(k.split("/")[1:]): v for k, v in data.items() if k.startswith("lora/")}
    return {k: v for k, v in data.items() if not k.startswith("lora/")}, flat


def _batch(arrays: dict) -> dict:
    batch = {k: arrays[k] for k in ("latents_w", "latents_l", "encoder_hidden_states")}
    if "text_embeds" in arrays:
        batch["added_cond"] = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    return batch


def _precision(config):
    """fp32 means fp32 (no TF32 on GPUs) when the benchmark computes in float32."""
    import jax

    return jax.default_matmul_precision("highest" if config.compute_dtype == "float32" else None)


class JaxTrain:
    """Our train step, compiled and warmed up on construction; `run()` times one repeat."""

    def __init__(self, config, workdir: str, tc):
        import jax
        from flax import traverse_util
        from jax.sharding import Mesh

        from safealign_jax.bench.build import build_train_step, step_model_flops
        from safealign_jax.models import load_unet
        from safealign_jax.perf.flops import count_flops
        from safealign_jax.perf.peak import device_peak
        from safealign_jax.train import mesh as mesh_lib
        from safealign_jax.train.model import unet_module

        self.config = config
        arrays, flat = load_inputs(workdir)
        loaded, params = load_unet(tc.model.path, param_dtype=jax.numpy.dtype(tc.model.param_dtype))
        module = unet_module(tc, loaded.config)
        batch, empty = _batch(arrays), np.zeros(arrays["encoder_hidden_states"].shape[1:], np.float32)
        device = jax.devices()[0]
        mesh = Mesh(np.array([device]).reshape(1, 1), mesh_lib.AXES)
        tree = traverse_util.unflatten_dict(flat)
        step = build_train_step(tc, module, params, batch, empty, trainable={"lora": tree}, mesh=mesh)
        with _precision(config):
            start = time.perf_counter()
            self.compiled = step.compile()
            compile_s = time.perf_counter() - start
            inputs = module.dummy_inputs(batch=1, size=config.resolution // 8, seq_len=config.seq_len)
            forward = count_flops(module.clone(attention="xla").apply, {"params": params}, *inputs)
            model = step_model_flops(step, module)
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = self.compiled.memory_analysis()
        self.args = list(step.put())
        peak = device_peak(device, config.peak_matmul_size)
        self.info = {
            "device": f"{device.platform}: {device.device_kind}", "compile_s": compile_s,
            "threads": len(os.sched_getaffinity(0)), "attention": tc.model.attention,
            "unet_forward_flops": forward, "model_flops": model,
            "flops_xla": float(cost.get("flops", 0.0)) if cost else None,
            "compiled_memory_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
            "peak": {"tflops": peak.flops / 1e12, "source": peak.source},
        }
        if config.parity:
            self.info["parity"] = self._parity(workdir, tc, tree, batch)
        start = time.perf_counter()
        self._steps(config.warmup)
        self.info["warmup_s"] = time.perf_counter() - start

    def _steps(self, n: int) -> None:
        import jax

        state, params, batch, empty = self.args
        for _ in range(n):
            state, _ = self.compiled(state, params, batch, empty)
        jax.block_until_ready(state)
        self.args[0] = state

    def run(self) -> float:
        start = time.perf_counter()
        self._steps(self.config.steps_per_repeat)
        return (time.perf_counter() - start) / self.config.steps_per_repeat

    def report(self) -> dict:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return {**self.info, "peak_memory_bytes": stats.get("peak_bytes_in_use")}

    def _parity(self, workdir, tc, tree, batch) -> dict:
        """The fp32 loss of `dpo.diffusion_dpo_loss` at "highest" precision; saves the noise and
        timesteps it drew to workdir/parity.npz for the torch side."""
        import jax

        from safealign_jax import dpo
        from safealign_jax.models import load_unet
        from safealign_jax.train.objective import training_schedule
        from safealign_jax.trainable import Trainable

        module, params = load_unet(tc.model.path)
        module = module.clone(attention=tc.model.attention)
        schedule = training_schedule("", "epsilon")
        key = jax.random.key(self.config.seed + 1)

        def loss(tree, params, batch):
            return dpo.diffusion_dpo_loss(module.apply, params, Trainable({"lora": tree}).collections(), batch,
                                          schedule, key, self.config.parity_beta)

        with jax.default_matmul_precision("highest"):
            value, metrics = jax.jit(loss)(tree, params, batch)
            noise, t = jax.jit(lambda: dpo._draw(key, batch["latents_w"].shape, torch_reference.NUM_TRAIN_TIMESTEPS))()
        np.savez(os.path.join(workdir, "parity.npz"), noise=np.asarray(noise), t=np.asarray(t))
        names = ("mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l")
        return {"loss": float(value), **{k: float(metrics[k]) for k in names}}


def _prompts(config) -> list[str]:
    return [f"a photo of a cat number {i}" for i in range(config.sampling.batch)]


def _image_size(config) -> int:
    """Pixels of the sampled images: the training latents' size times the VAE's factor."""
    return config.resolution // 8 * 2 ** (len(config.sampling.vae.block_out_channels) - 1)


class JaxSample:
    """Our `pipeline.generate` (DDIM, classifier-free guidance, VAE decode); `run()` times one call."""

    def __init__(self, config, workdir: str, tc):
        import jax.numpy as jnp

        from safealign_jax.models import load_unet
        from safealign_jax.pipeline import generate, load_pipeline

        dtype = jnp.dtype(config.compute_dtype)
        module, params = load_unet(tc.model.path, dtype=dtype)
        pipe = load_pipeline(tc.model.path, dtype=dtype, unet=(module.clone(attention=tc.model.attention), params))
        size = _image_size(config)
        prompts, seeds = _prompts(config), list(range(config.sampling.batch))
        self.call = lambda: generate(pipe, prompts, seeds, num_steps=config.sampling.steps,
                                     guidance=config.sampling.guidance, sampler="ddim", height=size, width=size)
        with _precision(config):
            start = time.perf_counter()
            self.images = self.call()
        self.info = {"first_call_s": time.perf_counter() - start, "dtype": config.compute_dtype}
        self.config = config

    def run(self) -> float:
        with _precision(self.config):
            start = time.perf_counter()
            self.images = self.call()
        return time.perf_counter() - start

    def report(self) -> dict:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return {**self.info, "finite": bool(np.isfinite(self.images).all()),
                "peak_memory_bytes": stats.get("peak_bytes_in_use")}


def make_side(name: str, config, workdir: str, tc):
    """The side `name` of SIDES_TRAIN / SIDES_SAMPLE, built and warmed up."""
    if name == "jax_train":
        return JaxTrain(config, workdir, tc)
    if name == "jax_sample":
        return JaxSample(config, workdir, tc)
    if name == "diffusers_sample":
        return torch_reference.DiffusersSample(config, workdir, _prompts(config), _image_size(config))
    arrays, flat = load_inputs(workdir)
    return torch_reference.TorchTrain(config, workdir, arrays, flat, compiled=name == "torch_compile")


class Worker:
    """A side in its own process (`python -m safealign_jax.bench.compare WORKDIR NAME CPUS`),
    driven line by line over its stdin / stdout: "run" -> seconds, "report" -> its report."""

    def __init__(self, name: str, workdir: str, cpus: list[int]):
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "safealign_jax.bench.compare", workdir, name, ",".join(map(str, cpus))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()  # {"ready": ...}: built and warmed up

    def _read(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self.process.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def _ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def run(self) -> float:
        return self._ask("run")["seconds"]

    def report(self) -> dict:
        report = self._ask("report")
        self.process.wait()
        return report


def _serve(workdir: str, name: str, cpus: list[int]) -> None:
    """The worker's side of `Worker` (stdout carries the protocol; anything printed goes to stderr)."""
    os.sched_setaffinity(0, cpus)
    protocol, sys.stdout = sys.stdout, sys.stderr
    say = lambda obj: (protocol.write(json.dumps(obj) + "\n"), protocol.flush())  # noqa: E731
    try:
        if name.startswith(("torch", "diffusers")):
            import torch

            torch.set_num_threads(len(cpus))
        with open(os.path.join(workdir, "config.json")) as f:
            config, tc = (ml_collections.ConfigDict(c) for c in json.load(f))
        side = make_side(name, config, workdir, tc)
    except Exception as e:  # reported to the parent, which records "n/a" with the reason
        say({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" if str(e) else type(e).__name__})
        return
    say({"ready": True})
    for line in sys.stdin:
        if line.strip() == "run":
            say({"seconds": side.run()})
        else:
            say({**side.report(), "peak_rss_bytes": _rss_bytes()})
            return


def time_sides(names, config, workdir: str, tc, cpus: list[int], repeats: int) -> dict:
    """Builds each side (a `Worker` with config.isolate, else in this process), then times
    `repeats` alternating rounds (A B ..., ... B A); returns {name: report with "seconds" (median)
    and "seconds_repeats"} or {name: {"n/a": reason}} for a side that failed to build or run."""
    sides, results = {}, {}
    for name in names:
        try:
            sides[name] = Worker(name, workdir, cpus) if config.isolate else make_side(name, config, workdir, tc)
        except Exception as e:  # torch.compile fails on some devices / toolchains: say why
            results[name] = {"n/a": str(e).strip().splitlines()[0][:300] if str(e) else type(e).__name__}
    times = {name: [] for name in sides}
    for r in range(repeats):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            times[name].append(sides[name].run())
    for name, side in sides.items():
        report = side.report()
        report.setdefault("peak_rss_bytes", _rss_bytes())
        results[name] = {**report, "seconds": statistics.median(times[name]), "seconds_repeats": times[name]}
    return results


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "peft", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def run_benchmark(config, base_train_config, workdir: str, command: str) -> dict:
    """Builds the models and inputs, times the train sides then the sampling sides, and writes
    workdir/benchmark.json; returns the report (see `assemble`)."""
    os.makedirs(workdir, exist_ok=True)
    tc = train_config(config, base_train_config, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump([config.to_dict(), tc.to_dict()], f)
    torch_reference.build_models(config, workdir)
    make_inputs(config, workdir)
    cpus = sorted(os.sched_getaffinity(0))[:config.threads or None]
    names = [n for n in SIDES_TRAIN if n != "torch_compile" or config.torch_compile]
    results = {"train": time_sides(names, config, workdir, tc, cpus, config.repeats)}
    if config.sampling.enabled:
        results["sample"] = time_sides(SIDES_SAMPLE, config, workdir, tc, cpus, config.sampling.repeats)
    report = assemble(config, tc, results, command, cpus)
    with open(os.path.join(workdir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def assemble(config, tc, results: dict, command: str, cpus: list[int]) -> dict:
    """The JSON report: setup, per-side figures (pairs/s, TFLOP/s, MFU), FLOPs, ratios, parity."""
    ours = results["train"]["jax_train"]
    theirs = results["train"]["torch_eager"]
    pairs, flops, peak = config.pairs, ours["model_flops"], ours["peak"]["tflops"] * 1e12
    train = {}
    for name, entry in results["train"].items():
        if "seconds" in entry:
            entry = {**entry, "step_s": entry.pop("seconds"), "step_s_repeats": entry.pop("seconds_repeats")}
            entry.update(pairs_per_s=pairs / entry["step_s"], model_tflops=flops / entry["step_s"] / 1e12,
                         mfu=flops / entry["step_s"] / peak)
        train[name] = entry
    train.setdefault("torch_compile", {"n/a": "disabled (torch_compile=False)"})
    ratios = {f"{name}_over_jax_step_time": train[name]["step_s"] / train["jax_train"]["step_s"]
              for name in ("torch_eager", "torch_compile") if "step_s" in train[name]}
    report = {
        "preset": config.preset, "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": {"jax": ours["device"], "torch": theirs.get("device"), "cpu": platform.processor(),
                   "pinned_cpus": cpus if config.isolate else None},
        "versions": _versions(),
        "setup": {"unet": dict(config.unet), "resolution": config.resolution, "pairs": pairs,
                  "seq_len": config.seq_len, "compute_dtype": config.compute_dtype,
                  "param_dtype": tc.model.param_dtype, "torch_autocast": theirs.get("autocast"),
                  "remat_policy": config.remat_policy, "attention": ours["attention"],
                  "lora": {"rank": config.lora_rank, "alpha": config.lora_rank, "targets": torch_reference.TARGETS},
                  "warmup_steps": config.warmup, "repeats": config.repeats, "steps_per_repeat": config.steps_per_repeat,
                  "isolated_processes": config.isolate, "alternating_repeats": True},
        "peak": ours["peak"],
        "flops": {"unet_forward": ours["unet_forward_flops"], "model_per_step": flops,
                  "xla_per_step": ours["flops_xla"], "torch_counter_per_step": theirs.get("flops_counter"),
                  "model_rule": "one jaxpr count of the train step (matmuls and convolutions x 2), "
                                "XLA attention, no remat recomputation"},
        "train": train, "ratios": ratios,
    }
    if config.parity and "parity" in theirs:
        a, b = ours["parity"], theirs["parity"]
        report["parity"] = {"beta": config.parity_beta, "jax": a, "torch": b,
                            "loss_rel_err": abs(a["loss"] - b["loss"]) / abs(b["loss"]),
                            "mse_rel_err": max(abs(a[k] - b[k]) / abs(b[k]) for k in a if k != "loss")}
    if "sample" in results:
        js, ts = results["sample"]["jax_sample"], results["sample"]["diffusers_sample"]
        for entry in (js, ts):
            entry["images_per_s"] = config.sampling.batch / entry["seconds"]
        report["sampling"] = {"steps": config.sampling.steps, "guidance": config.sampling.guidance,
                              "batch": config.sampling.batch, "sampler": "DDIM", "jax": js, "diffusers": ts,
                              "diffusers_over_jax_time": ts["seconds"] / js["seconds"]}
    return report


def _fmt(value, scale=1.0) -> str:
    return "-" if value is None else f"{value * scale:.3g}"


def table(report: dict) -> str:
    """The side-by-side table (markdown)."""
    train = report["train"]
    cols = [("ours (JAX)", train["jax_train"]), ("torch eager", train["torch_eager"]),
            ("torch.compile", train["torch_compile"])]
    mib = 1 / 2**20
    rows = [("train step, ms (median)", "step_s", 1e3), ("pairs/s", "pairs_per_s", 1),
            ("TFLOP/s (model count)", "model_tflops", 1), ("MFU", "mfu", 1),
            ("peak device memory, MiB", "peak_memory_bytes", mib),
            ("peak process RSS, MiB", "peak_rss_bytes", mib), ("warm-up s", "warmup_s", 1)]
    lines = ["| | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, scale in rows:
        cells = ["n/a" if "n/a" in entry else _fmt(entry.get(key), scale) for _, entry in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratio = report["ratios"]
    lines.append("| step time / ours | 1 | " + " | ".join(
        _fmt(ratio.get(f"{n}_over_jax_step_time")) for n in ("torch_eager", "torch_compile")) + " |")
    lines.append(f"| compile s (ours, AOT) | {_fmt(train['jax_train']['compile_s'])} | | |")
    lines.append(f"| XLA buffers of the compiled step, MiB | "
                 f"{_fmt(train['jax_train']['compiled_memory_bytes'], mib)} | | |")
    if "sampling" in report:
        s = report["sampling"]
        lines.append(f"| sampling images/s ({s['steps']} DDIM steps, CFG {s['guidance']}, batch "
                     f"{s['batch']}) | {_fmt(s['jax']['images_per_s'])} | "
                     f"{_fmt(s['diffusers']['images_per_s'])} (diffusers) | |")
    f = report["flops"]
    notes = [f"peak: {report['peak']['source']}",
             f"FLOPs per step: model {f['model_per_step']:.3e}, XLA {_fmt(f['xla_per_step'])}, "
             f"torch counter {_fmt(f['torch_counter_per_step'])}"]
    if "parity" in report:
        p = report["parity"]
        notes.append(f"fp32 parity: loss ours {p['jax']['loss']:.6g} vs torch {p['torch']['loss']:.6g} "
                     f"(rel err {p['loss_rel_err']:.1e}; per-image errors {p['mse_rel_err']:.1e})")
    notes += [f"{name}: n/a ({entry['n/a']})" for name, entry in cols if "n/a" in entry]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")])
