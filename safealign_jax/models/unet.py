"""Flax port of diffusers' UNet2DConditionModel (SD1.x, SD2.x, SDXL), NHWC.

    module.apply({"params": params[, "lora": ..., "adapter": ...]},
                 sample, timesteps, encoder_hidden_states, added_cond=None, user_tokens=None)

sample (B, H, W, C_in) latents; timesteps (B,) or scalar; encoder_hidden_states (B, S, D);
added_cond = {"text_embeds": (B, P), "time_ids": (B, 6)} for SDXL; user_tokens (B, N, D) for
PSA. Returns the prediction (B, H, W, C_out) in `dtype`.
"""

import jax.numpy as jnp
from flax import linen as nn

from safealign_jax.errors import UserError
from safealign_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from safealign_jax.models.layers import Dtype, conv, group_norm
from safealign_jax.models.remat import remat, split
from safealign_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock
from safealign_jax.models.unet_config import UNetConfig


class UNet2DConditionModel(nn.Module):
    """Attributes:
    config: the structure (from the checkpoint's config.json).
    dtype: compute dtype; param_dtype: parameter storage dtype.
    remat_policy: rematerialisation in the backward pass, one of `remat.UNET_REMAT_POLICIES`:
      "none"; "full", "dots", "dots_no_batch" per UNet block; "full_per_layer", "dots_per_layer",
      "dots_no_batch_per_layer" per ResnetBlock2D / BasicTransformerBlock (see models/remat.py).
      No policy saves attention scores: the "chunked" path rematerialises them per query block,
      the fused kernels never keep them.
    attention: the attention implementation, one of `attention.IMPLEMENTATIONS` ("auto":
      cuDNN / Pallas flash where they apply, else the query-chunked path).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None, user_tokens=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        factor = 2**cfg.num_upsamplers
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise UserError(
                f"latent size {sample.shape[1:3]} must be a multiple of {factor} for this UNet."
            )
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if added_cond is None:
                raise UserError("this UNet (SDXL-style text_time) needs added_cond={'text_embeds', 'time_ids'}.")
            time_ids = added_cond["time_ids"]
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            ).reshape(batch, -1)
            add = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), time_embeds], axis=-1)
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(add.astype(self.dtype))

        block_remat, layer_remat = split(self.remat_policy)
        context = encoder_hidden_states.astype(self.dtype)
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(self.dtype))
        block_kw = dict(
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=cfg.upcast_attention,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            attention=self.attention,
            output_scale_factor=cfg.resnet_out_scale_factor,
            layer_remat=layer_remat,
            **kw,
        )

        skips = [x]
        n = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = remat(DownBlock, block_remat)(
                out_channels=cfg.block_out_channels[i],
                num_layers=cfg.layers_per_block[i],
                has_attention=block_type == "CrossAttnDownBlock2D",
                heads=cfg.attention_head_dim[i],
                transformer_layers=cfg.transformer_layers_per_block[i],
                add_downsample=i < n - 1,
                name=f"down_blocks_{i}",
                **block_kw,
            )(x, temb, context, user_tokens)
            skips.extend(block_skips)

        x = remat(MidBlock, block_remat)(
            out_channels=cfg.block_out_channels[-1],
            num_layers=1,
            has_attention=True,
            heads=cfg.attention_head_dim[-1],
            transformer_layers=cfg.transformer_layers_per_block[-1],
            name="mid_block",
            **(block_kw | {"output_scale_factor": cfg.mid_block_scale_factor}),
        )(x, temb, context, user_tokens)

        for i, block_type in enumerate(cfg.up_block_types):
            level = n - 1 - i
            num_layers = cfg.layers_per_block[level] + 1
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            x = remat(UpBlock, block_remat)(
                out_channels=cfg.block_out_channels[level],
                num_layers=num_layers,
                has_attention=block_type == "CrossAttnUpBlock2D",
                heads=cfg.attention_head_dim[level],
                transformer_layers=cfg.transformer_layers_per_block[level],
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
                **block_kw,
            )(x, block_skips, temb, context, user_tokens)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)

    def dummy_inputs(self, batch: int = 1, size: int | None = None, seq_len: int = 77):
        """Zero inputs of the right shapes, for init / eval_shape."""
        cfg = self.config
        size = size or cfg.sample_size
        sample = jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32)
        context = jnp.zeros((batch, seq_len, cfg.cross_attention_dim), jnp.float32)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, pooled)), "time_ids": jnp.zeros((batch, 6))}
        return sample, jnp.zeros((batch,), jnp.int32), context, added
