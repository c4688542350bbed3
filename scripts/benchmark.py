"""Our Diffusion-DPO LoRA train step and sampler against the PyTorch reference, or the compiled
memory of our train step (issues #11, #17). See BENCHMARKS.md.

The command is safealign_jax/commands/benchmark.py (installed as `safealign-benchmark`), whose docstring
gives the usage; `main(config, workdir, command)` is its work.
"""

from safealign_jax.commands import benchmark as command

main = command.run

if __name__ == "__main__":
    command.main()
