"""Validation of the training config (configs/train.py): one-line UserErrors naming the field."""

from safealign_jax.errors import UserError
from safealign_jax.models.remat import UNET_REMAT_POLICIES
from safealign_jax.models.resolve import resolve_model

CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat_policy": UNET_REMAT_POLICIES,
    "model.prediction_type": ("epsilon", "v_prediction"),
    "optim.name": ("adamw", "adafactor"),
    "optim.schedule": ("constant", "cosine"),
    "data.source": ("synthetic", "cache", "sage_cache"),
    "data.flip": ("none", "shared", "independent"),
}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _require(config, dotted: str, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"--config.{dotted}={_get(config, dotted)!r} is invalid (expected {expected}).")


def validate(config) -> None:
    """Raises UserError for the first invalid value of a training config; resolves
    `config.model.path` in place to a local folder (`models.resolve.resolve_model`)."""
    for dotted, allowed in CHOICES.items():
        _require(config, dotted, _get(config, dotted) in allowed, f"one of {list(allowed)}")
    _require(config, "lora.rank", config.lora.rank >= 1, "an integer >= 1")
    _require(config, "lora.alpha", config.lora.alpha > 0, "a number > 0")
    _require(config, "dpo.beta", config.dpo.beta >= 0, "a number >= 0")
    _require(config, "dpo.caption_dropout", 0 <= config.dpo.caption_dropout <= 1, "a probability in [0, 1]")
    _require(config, "optim.learning_rate", config.optim.learning_rate > 0, "a number > 0")
    _require(config, "optim.warmup_steps", config.optim.warmup_steps >= 0, "an integer >= 0")
    _require(config, "optim.clip_norm", config.optim.clip_norm >= 0, "a number >= 0 (0 disables)")
    _require(config, "optim.grad_accum", config.optim.grad_accum >= 1, "an integer >= 1")
    _require(config, "optim.weight_decay", config.optim.weight_decay >= 0, "a number >= 0")
    _require(config, "train.steps", config.train.steps >= 1, "an integer >= 1")
    _require(config, "train.pairs_per_device", config.train.pairs_per_device >= 1, "an integer >= 1")
    _require(config, "train.log_every", config.train.log_every >= 1, "an integer >= 1")
    _require(config, "train.checkpoint_every", config.train.checkpoint_every >= 1, "an integer >= 1")
    _require(config, "train.keep_checkpoints", config.train.keep_checkpoints >= 1, "an integer >= 1")
    _require(config, "train.sample_every", config.train.sample_every >= 0, "an integer >= 0 (0 disables)")
    _require(config, "train.sample_steps", config.train.sample_steps >= 1, "an integer >= 1")
    _require(config, "data.resolution", config.data.resolution >= 8 and config.data.resolution % 8 == 0,
             "a positive multiple of 8")
    _require(config, "data.seq_len", config.data.seq_len >= 1, "an integer >= 1")
    if config.data.source in ("cache", "sage_cache"):
        _require(config, "data.cache_dir", bool(config.data.cache_dir),
                 "a folder written by scripts/prepare_data.py")
        _require(config, "data.num_threads", config.data.num_threads >= 0, "an integer >= 0")
    _validate_psa(config)
    for field in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        _require(config, f"distributed.{field}", config.distributed[field] >= 1, "an integer >= 1 (seconds)")
    for axis in ("data", "fsdp"):
        size = config.mesh[axis]
        _require(config, f"mesh.{axis}", size == -1 or size >= 1, "-1 (fill) or an integer >= 1")
    if config.mesh.data == -1 and config.mesh.fsdp == -1:
        raise UserError("--config.mesh.data and --config.mesh.fsdp are both -1 (at most one may fill).")
    if not config.model.path and config.preset != "tiny":
        raise UserError(f"--config.model.path is empty: preset {config.preset!r} needs a diffusers folder.")
    if config.model.path:  # a hub id becomes its cache folder, which the run then records
        config.model.path = resolve_model(config.model.path, "--config.model.path")


def _validate_psa(config) -> None:
    """The PSA fields, and data sources that do (not) carry users."""
    psa = config.psa
    _require(config, "psa.embed_dim", psa.embed_dim >= 1, "an integer >= 1")
    _require(config, "psa.num_tokens", psa.num_tokens >= 1, "an integer >= 1")
    _require(config, "psa.scale", psa.scale >= 0, "a number >= 0")
    if config.data.source == "sage_cache":
        _require(config, "psa.enable", psa.enable, "True with --config.data.source=sage_cache")
        _require(config, "data.embeddings", bool(config.data.embeddings), "a folder of {user_id}.npy files")
    if psa.enable:
        _require(config, "data.source", config.data.source != "cache",
                 "synthetic or sage_cache with --config.psa.enable (CoProV2 pairs have no users)")
        _require(config, "train.sample_every", config.train.sample_every == 0,
                 "0 with --config.psa.enable (sample users with scripts/sample.py)")
