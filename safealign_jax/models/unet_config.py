"""The typed UNet configuration, read from a diffusers `unet/config.json`.

Every field the port understands is a field here; values it does not implement are refused
with one error naming the field and the value, never silently built into a wrong model.
"""

import dataclasses
from collections.abc import Sequence

from safealign_jax.errors import UserError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Fields of diffusers' UNet2DConditionModel config that must keep one value (or be absent).
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_embedding_dim": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "class_embeddings_concat": (False,),
    "resnet_skip_time_act": (False,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "downsample_padding": (1,),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "addition_embed_type": (None, "text_time"),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}
# Fields that do not change the network (read and ignored).
_IGNORED = {"dropout", "addition_embed_type_num_heads"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The structure of a UNet2DConditionModel (diffusers field names and meanings).

    `attention_head_dim` is, as in diffusers' UNet2DConditionModel, the number of HEADS per
    block (a historical misnomer); the head width is channels // heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    center_input_sample: bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1.0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "config.json") -> "UNetConfig":
        """Parses a diffusers UNet2DConditionModel config dict; `source` names it in errors."""
        fail = lambda field, value, expected: UserError(  # noqa: E731
            f"{source}: unsupported {field}={value!r} (this port supports {expected})."
        )
        cls_name = config.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise fail("_class_name", cls_name, "'UNet2DConditionModel'")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _FIXED:
                allowed = _FIXED[key]
                if isinstance(value, list) and key == "only_cross_attention":
                    value = any(value)
                if value not in allowed:
                    raise fail(key, value, " or ".join(repr(a) for a in allowed))
                if key not in known:
                    continue
            elif key not in known:
                if value in (None, False):
                    continue
                raise UserError(f"{source}: unknown field {key}={value!r} for a UNet2DConditionModel.")
            values[key] = value
        if values.get("sample_size") is None:
            values.pop("sample_size", None)
        n = len(values.get("block_out_channels", cls.block_out_channels))
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            if key in values:
                values[key] = _per_block(values[key], n, key, source)
            else:
                values[key] = _per_block(getattr(cls, key)[0], n, key, source)
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = tuple(values[key])
        cross = values.get("cross_attention_dim", cls.cross_attention_dim)
        if isinstance(cross, Sequence):
            if len(set(cross)) != 1:
                raise fail("cross_attention_dim", cross, "one width for all blocks")
            values["cross_attention_dim"] = cross[0]
        config_obj = cls(**values)
        config_obj.validate(source)
        return config_obj

    def validate(self, source: str = "config") -> None:
        """Checks the structure is one this port builds; raises UserError otherwise."""
        n = len(self.block_out_channels)
        for field, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCKS),
            ("up_block_types", self.up_block_types, UP_BLOCKS),
        ):
            if len(types) != n:
                raise UserError(f"{source}: {field} has {len(types)} entries, expected {n}.")
            for t in types:
                if t not in allowed:
                    raise UserError(f"{source}: unsupported {field} entry {t!r} (supported: {allowed}).")
        for ch, heads in zip(self.block_out_channels, self.attention_head_dim, strict=True):
            if ch % heads or ch % self.norm_num_groups:
                raise UserError(
                    f"{source}: block_out_channels {ch} must divide by its heads ({heads}) "
                    f"and norm_num_groups ({self.norm_num_groups})."
                )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise UserError(
                f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim."
            )


def _per_block(value, n: int, field: str, source: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise UserError(f"{source}: {field}={value!r} must be an int or a list of {n} ints.")
