"""Exports a training checkpoint for PyTorch users (see configs/export.py for the formats).

The command is safealign_jax/commands/export.py (installed as `safealign-export`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import export as command

main = command.run

if __name__ == "__main__":
    command.main()
