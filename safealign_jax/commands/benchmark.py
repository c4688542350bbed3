"""Our Diffusion-DPO LoRA train step and sampler against the PyTorch reference, or the compiled
memory of our train step (issues #11, #17). See BENCHMARKS.md.

    python scripts/benchmark.py --config configs/benchmark.py:tiny --workdir runs/bench
    python scripts/benchmark.py --config configs/benchmark.py:sd15 --config.mode=memory --workdir runs/mem

mode=compare (`safealign_jax.bench.compare`): random weights at the preset's UNet config, built by
diffusers and read by `load_unet`; ours is the trainer's step (configs/train.py:<preset> set to
the benchmark's sizes, dtypes, remat, attention, LoRA and AdamW), theirs the official script's
(diffusers + peft, SDPA, bf16 autocast on GPU), eager and torch.compile; then sampling (our
`pipeline.generate` vs diffusers, DDIM + CFG). Each side in its own process pinned to the same
CPUs, timed repeats alternating between the sides. Writes workdir/benchmark.json and prints a
markdown table. FLOPs: one jaxpr count of the step (`perf.flops.model_flops`); MFU against
the datasheet peak (GPU / TPU) or a measured fp32 matmul peak (CPU), named in the report.

mode=memory (`safealign_jax.bench.memory`): AOT-compiles the train step of
configs/train.py:<preset> at memory_pairs_per_device for this host's devices from abstract shapes
(no weights), and writes XLA's memory analysis to workdir/memory.json.

Installed as `safealign-benchmark --config benchmark:tiny --workdir runs/bench`.
"""

import json
import os
import sys

from safealign_jax import cli
from safealign_jax.configs import train as train_configs


def base_train_config(preset: str):
    """configs/train.py:<preset>."""
    return train_configs.get_config(preset)


def memory(config, workdir: str) -> dict:
    """XLA's memory analysis of the trainer's step at the preset's size; writes workdir/memory.json."""
    from safealign_jax.bench.memory import GB, compiled_memory
    from safealign_jax.models import UNetConfig

    tc = base_train_config(config.preset)
    tc.train.pairs_per_device = config.memory_pairs_per_device
    tc.model.attention, tc.model.remat_policy = config.attention, config.remat_policy
    tc.data.resolution, tc.data.seq_len = config.resolution, config.seq_len
    result = compiled_memory(tc, UNetConfig.from_diffusers(config.unet.to_dict(), "configs/benchmark.py"))
    with open(os.path.join(workdir, "memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{config.preset}: {result['pairs_per_device']} pairs/device at {config.resolution} px, "
          f"{result['compute_dtype']} compute, {result['param_dtype']} base, remat {result['remat_policy']}, "
          f"attention {result['attention']}, compiled on {result['platform']} in {result['compile_s']:.0f} s")
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes"):
        print(f"  {key.removesuffix('_bytes'):>9}: {result[key] / GB:8.2f} GB")
    print(f"  model FLOPs per step: {result['model_flops'] / 1e12:.2f} TFLOP "
          f"({result['model_flops'] / result['pairs_per_device'] / result['devices'] / 1e12:.2f} per pair)")
    return result


def run(config, workdir: str, command: str = "") -> dict:
    """Runs `config.mode`; returns its report."""
    from safealign_jax.bench import compare
    from safealign_jax.errors import check
    from safealign_jax.models.attention import IMPLEMENTATIONS

    check(config.attention in IMPLEMENTATIONS,
          f"--config.attention={config.attention!r} is unknown (expected one of {IMPLEMENTATIONS}).")
    check(config.mode in ("compare", "memory"),
          f"--config.mode={config.mode!r} is unknown (expected compare or memory).")
    os.makedirs(workdir, exist_ok=True)
    if config.mode == "memory":
        return memory(config, workdir)
    report = compare.run_benchmark(config, base_train_config(config.preset), workdir,
                                   command or " ".join(sys.argv))
    print(compare.table(report))
    return report



def main() -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the device
    cli.main(lambda config, workdir: run(config, workdir))
