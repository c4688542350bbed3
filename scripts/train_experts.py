"""SafetyDPO safety experts: one LoRA per category of the latent cache, trained one after the other.

    python scripts/train_experts.py --config configs/train.py:sd15 --workdir runs/experts \
        --config.model.path=/models/sd15 --config.data.source=cache --config.data.cache_dir=cache

The command is safealign_jax/commands/train_experts.py (installed as `safealign-train-experts`);
`main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import train_experts as command

main = command.run

if __name__ == "__main__":
    command.main()
