"""The README's main command: safety alignment end to end in the synthetic world, on any CPU.

The command is safealign_jax/commands/demo.py (installed as `safealign-demo`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import demo as command

main = command.run

if __name__ == "__main__":
    command.main()
