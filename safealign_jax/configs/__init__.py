"""The ml_collections configs of the scripts, shipped with the package: `configs/NAME.py`
(a link to this folder in the checkout) or, from anywhere, `--config NAME:preset`.

Each module has `get_config(arg)`; configs import each other as `safealign_jax.configs.NAME`.
"""


def choose_preset(name: str, arg: str | None, presets: tuple[str, ...]) -> str:
    """The preset `arg` of configs/`name`.py (None or "" = the first of `presets`); ValueError
    `configs/NAME.py:ARG: unknown preset (...)` otherwise, which the commands print as one line."""
    preset = arg or presets[0]
    if preset not in presets:
        raise ValueError(f"configs/{name}.py:{preset}: unknown preset (expected one of {presets}).")
    return preset
