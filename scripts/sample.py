"""Generates one PNG per prompt, a manifest (JSONL) and a contact sheet; resumable.

The command is safealign_jax/commands/sample.py (installed as `safealign-sample`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import sample as command

main = command.run

if __name__ == "__main__":
    command.main()
