"""Writes one PSA user embedding per user: OUT/<7-digit user id>.npy, float32, shape (hidden,).

The command is safealign_jax/commands/embed_users.py (installed as `safealign-embed-users`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import embed_users as command

main = command.run

if __name__ == "__main__":
    command.main()
