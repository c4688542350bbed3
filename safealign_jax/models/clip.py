"""Flax port of transformers' CLIPTextModel / CLIPTextModelWithProjection, and the CLIP tokenizer.

Covers the Stable Diffusion text encoders: SD1.x (CLIP ViT-L/14, quick_gelu), SD2.x (OpenCLIP
ViT-H in CLIPTextModel form, gelu) and SDXL (text_encoder: CLIP-L; text_encoder_2: OpenCLIP
bigG with projection).

    module.apply({"params": params[, "lora": ...]}, input_ids, attention_mask=None) -> CLIPTextOutput

input_ids (B, L) int with L <= max_position_embeddings; attention_mask (B, L) of 1 (token) / 0
(padding) or None (SD pipelines pass none). Module names equal transformers' attribute names
(`text_model.encoder.layers.3.self_attn.q_proj`, `text_projection`) so `CLIP_NAMES` maps the params
tree to checkpoint names in both directions.
"""

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from safealign_jax.convert.checkpoint import read_config, read_state_dict
from safealign_jax.convert.names import NameTable, params_from_state_dict
from safealign_jax.errors import UserError, check
from safealign_jax.models.layers import Dtype, DtypeModule
from safealign_jax.models.load import abstract_params, component_folder

CLIP_NAMES = NameTable(frozenset({"layers"}))

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# The checkpoint's pooling rule changes at this id: see `CLIPTextTransformer.pool`.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The structure of a CLIP text encoder (transformers' CLIPTextConfig names and defaults).

    Attributes:
      with_projection: CLIPTextModelWithProjection (adds `text_projection`, hidden -> projection_dim).
      eos_token_id: pooling position rule; 2 (old checkpoints) means "position of the largest id".
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False

    @classmethod
    def from_transformers(
        cls, config: dict, source: str = "config.json", with_projection: bool | None = None
    ) -> "CLIPTextConfig":
        """Parses a transformers text-encoder config.json; `source` names it in errors.

        `with_projection` decides the class when the config has no `architectures` entry.
        Fields outside the structure (dropouts, initialisers, token ids other than eos) are ignored.
        """
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise UserError(
                f"{source}: unsupported model_type={model_type!r} (expected 'clip_text_model', the "
                "config of a CLIPTextModel / CLIPTextModelWithProjection text encoder)."
            )
        architectures = config.get("architectures") or []
        for arch in architectures:
            if arch not in ARCHITECTURES:
                raise UserError(f"{source}: unsupported architectures entry {arch!r} (supported: {ARCHITECTURES}).")
        if architectures:
            with_projection = "CLIPTextModelWithProjection" in architectures
        values = {"with_projection": bool(with_projection)}
        for field in dataclasses.fields(cls):
            if field.name == "with_projection" or config.get(field.name) is None:
                continue
            value = config[field.name]
            expected = {"hidden_act": str, "layer_norm_eps": (int, float)}.get(field.name, int)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise UserError(f"{source}: {field.name}={value!r} has the wrong type.")
            values[field.name] = value
        parsed = cls(**values)
        parsed.validate(source)
        return parsed

    def validate(self, source: str = "config") -> None:
        """Checks the structure is one this port builds; raises UserError otherwise."""
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(
                f"{source}: unsupported hidden_act={self.hidden_act!r} (supported: {list(ACTIVATIONS)})."
            )
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "projection_dim",
        ):
            check(getattr(self, name) > 0, f"{source}: {name}={getattr(self, name)} must be positive.")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"{source}: hidden_size={self.hidden_size} must divide by num_attention_heads="
            f"{self.num_attention_heads}.",
        )
        check(self.layer_norm_eps > 0, f"{source}: layer_norm_eps={self.layer_norm_eps} must be positive.")


class CLIPTextOutput(NamedTuple):
    """Outputs of the text encoder (compute dtype).

    last_hidden_state: (B, L, D) output of the last layer after `final_layer_norm`.
    penultimate_hidden_state: (B, L, D) output of layer N-1 (transformers' hidden_states[-2]),
      without the final LayerNorm (what SDXL conditions on).
    pooled_output: (B, D) last_hidden_state at the end-of-text token.
    text_embeds: (B, projection_dim) `text_projection(pooled_output)`, or None without projection.
    """

    last_hidden_state: jax.Array
    penultimate_hidden_state: jax.Array
    pooled_output: jax.Array
    text_embeds: jax.Array | None


class CLIPAttention(DtypeModule):
    """Causal multi-head self-attention with q/k/v/out projections (all with bias)."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        """x: (B, L, D); key_mask: (B, 1, 1, L) bool (True = attend) or None."""
        b, length, width = x.shape
        split = lambda t: t.reshape(b, length, self.heads, width // self.heads)  # noqa: E731
        q, k, v = (split(self.dense(width, name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=True)
        return self.dense(width, "out_proj")(out.reshape(b, length, width))


class CLIPMLP(DtypeModule):
    """fc1 -> activation -> fc2."""

    intermediate_size: int
    hidden_act: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](self.dense(self.intermediate_size, "fc1")(x))
        return self.dense(x.shape[-1], "fc2")(h)


class CLIPModule(DtypeModule):
    """A part of the text encoder built from the whole `config`."""

    config: CLIPTextConfig


class CLIPEncoderLayer(CLIPModule):
    """Pre-LayerNorm residual block: self-attention, then MLP."""

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = self.layer_norm(cfg.layer_norm_eps, "layer_norm1")(x)
        x = x + CLIPAttention(cfg.num_attention_heads, name="self_attn", **self.dtypes)(h, key_mask)
        h = self.layer_norm(cfg.layer_norm_eps, "layer_norm2")(x)
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, name="mlp", **self.dtypes)(h)


class CLIPTextEmbeddings(CLIPModule):
    """Token embedding plus learned absolute position embedding."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name, **self.dtypes)  # noqa: E731
        positions = jnp.arange(input_ids.shape[-1])
        token = embed(cfg.vocab_size, "token_embedding")(input_ids)
        return token + embed(cfg.max_position_embeddings, "position_embedding")(positions)[None]


class CLIPEncoder(CLIPModule):
    """The stack of layers; returns (last output, output of the layer before it)."""

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        previous = x
        for i in range(self.config.num_hidden_layers):
            previous = x
            x = CLIPEncoderLayer(self.config, name=f"layers_{i}", **self.dtypes)(x, key_mask)
        return x, previous


class CLIPTextTransformer(CLIPModule):
    """transformers' `text_model`: embeddings, causal encoder, final LayerNorm, eos pooling."""

    def pool(self, hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
        """hidden (B, L, D) at each row's end-of-text position, exactly as transformers picks it:
        the largest id when eos_token_id == 2 (legacy configs), else the first eos_token_id."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            position = jnp.argmax(input_ids, axis=-1)
        else:
            position = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(hidden, position[:, None, None], axis=1)[:, 0]

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise UserError(
                f"token sequence length {length} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings} of this text encoder."
            )
        key_mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
        x = CLIPTextEmbeddings(cfg, name="embeddings", **self.dtypes)(input_ids)
        x, penultimate = CLIPEncoder(cfg, name="encoder", **self.dtypes)(x, key_mask)
        last = self.layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
        return last, penultimate, self.pool(last, input_ids)


class CLIPTextModel(CLIPModule):
    """CLIPTextModel, or CLIPTextModelWithProjection when `config.with_projection`.

    Call: input_ids (B, L) int, attention_mask (B, L) or None -> `CLIPTextOutput`.
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        last, penultimate, pooled = CLIPTextTransformer(self.config, name="text_model", **self.dtypes)(
            input_ids, attention_mask
        )
        text_embeds = None
        if self.config.with_projection:
            text_embeds = self.dense(self.config.projection_dim, "text_projection", use_bias=False)(pooled)
        return CLIPTextOutput(last, penultimate, pooled, text_embeds)


def _transformers_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint names in the `text_model.`-prefixed form; drops the `position_ids` buffer.

    transformers >= 5 saves a plain CLIPTextModel without the `text_model.` prefix; older
    versions and all WithProjection checkpoints keep it; some old files carry position_ids.
    """
    return {
        name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name: array
        for name, array in state_dict.items() if not name.endswith("embeddings.position_ids")
    }


def load_text_encoder(
    folder: str,
    subfolder: str = "text_encoder",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
) -> tuple[CLIPTextModel, dict]:
    """Loads a transformers CLIP text encoder as (Flax module, params).

    Args:
      folder: a text-encoder folder (config.json + model[.fp16].safetensors or a sharded index)
        or a pipeline folder containing `subfolder` ("text_encoder", or "text_encoder_2" for SDXL).
      dtype: compute dtype; param_dtype: dtype the weights are stored in.
      variant: weights variant ("fp16"); default: the plain file, else the fp16 one.
    Returns:
      (module, params) with params a tree of numpy arrays in `param_dtype`.
    """
    folder = component_folder(folder, subfolder)
    state_dict = _transformers_names(read_state_dict(folder, "model", variant))
    config = CLIPTextConfig.from_transformers(
        read_config(folder),
        os.path.join(folder, "config.json"),
        with_projection="text_projection.weight" in state_dict,
    )
    module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype)
    expected = abstract_params(module, jnp.zeros((1, 1), jnp.int32))
    params = params_from_state_dict(expected, state_dict, CLIP_NAMES, folder)
    return module, params


def _tokenizer_folder(folder: str, subfolder: str) -> str:
    check(os.path.isdir(folder), f"{folder}: no such folder.")
    markers = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
    if any(os.path.isfile(os.path.join(folder, m)) for m in markers):
        return folder
    sub = os.path.join(folder, subfolder)
    check(
        os.path.isdir(sub) and any(os.path.isfile(os.path.join(sub, m)) for m in markers),
        f"{folder}: neither a tokenizer folder (tokenizer_config.json, tokenizer.json or "
        f"vocab.json + merges.txt) nor a pipeline folder with {subfolder}/.",
    )
    return sub


def load_tokenizer(folder: str, subfolder: str = "tokenizer"):
    """Loads the transformers CLIPTokenizer of a pipeline (`tokenizer/`, `tokenizer_2/`) or folder."""
    from transformers import CLIPTokenizer  # tokenizers only; never imports torch

    path = _tokenizer_folder(folder, subfolder)
    try:
        return CLIPTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a loadable CLIP tokenizer ({e}).") from None


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
    """Token ids (B, max_length) int32 as the SD pipelines make them: <|startoftext|> prompt
    <|endoftext|>, truncated to and padded with the pad token up to `max_length` (default: the
    tokenizer's model_max_length, 77 for SD)."""
    max_length = tokenizer.model_max_length if max_length is None else max_length
    check(
        0 < max_length <= 100_000,
        f"max_length={max_length}: pass max_length (the tokenizer has no usable model_max_length).",
    )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return np.asarray(encoded["input_ids"], np.int32)
