"""PSA adapter sizes of the real SD1.5 and SDXL UNet structures (abstract shapes only, nothing
computed) against docs/METHODS.md section 3: SD1.5 16 cross-attentions, W_k' + W_v' ~19.2M, projection
~2.75M; SDXL 70 cross-attentions, ~340.8M + ~7.35M (E = 3584, N = 1)."""

import jax
import pytest

from safealign_jax import adapter
from safealign_jax.models import UNet2DConditionModel, UNetConfig
from safealign_jax.models.load import abstract_params

SD15 = {"cross_attention_dim": 768}
SDXL = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}


@pytest.mark.parametrize(
    ("config", "layers", "attention", "projection"),
    [(SD15, 16, 19_169_280, 2_754_816), (SDXL, 70, 340_787_200, 7_346_176)],
    ids=["sd15", "sdxl"],
)
def test_adapter_sizes_match_the_spec(config, layers, attention, projection):
    module = UNet2DConditionModel(UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **config}))
    params = abstract_params(module, *module.dummy_inputs(size=8, seq_len=4))
    tree = jax.eval_shape(lambda: adapter.init(jax.random.key(0), params, embed_dim=3584, num_tokens=1))
    counts = adapter.count(tree)
    assert len(adapter.cross_attention_paths(params)) == layers
    assert counts == {"projection": projection, "attention": attention, "total": projection + attention}
    # the rounded figures of docs/METHODS.md section 3
    spec = {16: (19.2e6, 2.75e6), 70: (340.8e6, 7.35e6)}[layers]
    assert abs(attention - spec[0]) < 0.05e6 and abs(projection - spec[1]) < 0.005e6
