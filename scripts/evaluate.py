"""The papers' evaluation of one model ("method"): generate each benchmark's images, score them, report.

The command is safealign_jax/commands/evaluate.py (installed as `safealign-evaluate`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import evaluate as command

main = command.run

if __name__ == "__main__":
    command.main()
