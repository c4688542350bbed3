"""Encodes a data set once (VAE latent moments + text embeddings): the latent cache training reads.

The command is safealign_jax/commands/prepare_data.py (installed as `safealign-prepare-data`), whose docstring
gives the usage; `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import prepare_data as command

main = command.run

if __name__ == "__main__":
    command.main()
