"""Merges safety experts (LoRA checkpoints) into one model; see configs/merge.py.

The command is safealign_jax/commands/merge.py (installed as `safealign-merge`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import merge as command

main = command.run

if __name__ == "__main__":
    command.main()
