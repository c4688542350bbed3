"""Closed-form concept editing of the cross-attention key / value layers; see configs/erase.py.

The command is safealign_jax/commands/erase.py (installed as `safealign-erase`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import erase as command

main = command.run

if __name__ == "__main__":
    command.main()
