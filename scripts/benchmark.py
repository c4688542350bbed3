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
markdown table. FLOPs: one jaxpr count of the step (`bench.flops.model_flops`); MFU against
the datasheet peak (GPU / TPU) or a measured fp32 matmul peak (CPU), named in the report.

mode=memory (`safealign_jax.bench.memory`): AOT-compiles the train step of
configs/train.py:<preset> at memory_pairs_per_device for this host's devices from abstract shapes
(no weights), and writes XLA's memory analysis to workdir/memory.json.

The command is safealign_jax/commands/benchmark.py (installed as `safealign-benchmark`);
`main(config, workdir, command)` is its work.
"""

from safealign_jax.commands import benchmark as command

main = command.run

if __name__ == "__main__":
    command.main()
