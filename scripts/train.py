"""Diffusion-DPO LoRA training (SafetyDPO). Resumes automatically from `--workdir`.

    python scripts/train.py --config configs/train.py[:tiny|sd15|sd21|sdxl] --workdir runs/x \
        [--config.model.path=/models/sd15 --config.train.steps=2000 ...]

The command is safealign_jax/commands/train.py (installed as `safealign-train`); `main(config,
workdir)` is its work, as in every script.
"""

from safealign_jax.commands import train as command

main = command.run

if __name__ == "__main__":
    command.main()
