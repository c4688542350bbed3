"""Converts a single-file checkpoint (A1111 / civitai) once into a diffusers pipeline folder.

    python scripts/convert_single_file.py --config configs/convert_single_file.py --workdir models/mine \
        --config.checkpoint=mine.safetensors --config.base=stable-diffusion-v1-5/stable-diffusion-v1-5

The command is safealign_jax/commands/convert_single_file.py (installed as
`safealign-convert-single-file`); `main(config, workdir)` is its work, as in every script.
"""

from safealign_jax.commands import convert_single_file as command

main = command.run

if __name__ == "__main__":
    command.main()
