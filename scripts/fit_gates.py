"""Gates of a user-gated PSA run fitted to a Sage cache's preference records; see configs/fit_gates.py.

The command is safealign_jax/commands/fit_gates.py (installed as `safealign-fit-gates`), whose
docstring gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import fit_gates as command

main = command.run

if __name__ == "__main__":
    command.main()
