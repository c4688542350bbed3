"""The ml_collections configs of the scripts, shipped with the package: `configs/NAME.py`
(a link to this folder in the checkout) or, from anywhere, `--config NAME:preset`.

Each module has `get_config(arg)`; configs import each other as `safealign_jax.configs.NAME`.
"""
