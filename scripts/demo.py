"""The README's main command: safety alignment end to end in the synthetic world, on any CPU.

    python scripts/demo.py --config configs/demo.py --workdir runs/demo

Leaves WORKDIR/report.md + report.json (targets, per-method and PSA tables), plots and image
grids (PNG), the exported Co-Merge LoRA (peft) and PSA adapter (IP-Adapter layout). Re-runs reuse
the cached base model and every finished stage. See safealign_jax/synthetic/demo.py.

The command is safealign_jax/commands/demo.py (installed as `safealign-demo`); `main(config,
workdir)` is its work, as in every script.
"""

from safealign_jax.commands import demo as command

main = command.run

if __name__ == "__main__":
    command.main()
