"""XLA's memory analysis of the AOT-compiled train step of a training config at full size, from
ShapeDtypeStructs only: the UNet's weights are never materialised (only the LoRA / adapter tree,
the optimizer state and one synthetic batch are real arrays, all small), so SD1.5 or SDXL steps
can be sized on a CPU host. Compiled for this process's devices; per-device figures.

On CPU the figures are an estimate of a GPU's: the same program and buffer assignment, but XLA's
CPU backend fuses differently and has no fused attention kernels ("auto" attention resolves to
the chunked path there).
"""

import os
import time

import jax

from safealign_jax.bench.build import build_train_step, step_model_flops
from safealign_jax.convert.checkpoint import read_config
from safealign_jax.models import UNetConfig
from safealign_jax.models.load import abstract_params, component_folder
from safealign_jax.train.data import SyntheticPairs
from safealign_jax.train.model import TINY_UNET, unet_module

GB = 1e9


def unet_structure(config) -> UNetConfig:
    """The UNet structure of config.model.path (its config.json only), or the tiny preset's."""
    if not config.model.path:
        return UNetConfig(**TINY_UNET)
    folder = component_folder(config.model.path, "unet")
    return UNetConfig.from_diffusers(read_config(folder), os.path.join(folder, "config.json"))


def abstract_batch(config, module, global_pairs: int) -> tuple[dict, jax.ShapeDtypeStruct]:
    """(batch, empty-prompt states) of the synthetic source's shapes and dtypes, as ShapeDtypeStructs."""
    cfg = module.config
    added = None
    if cfg.addition_embed_type == "text_time":
        added = (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, 6)
    source = SyntheticPairs(config.seed, 1, slice(0, 1), config.data.resolution // 8,
                            config.data.latent_channels, config.data.seq_len, cfg.cross_attention_dim,
                            added, user_dim=config.psa.embed_dim if config.psa.enable else 0)
    one = next(source)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((global_pairs, *x.shape[1:]), x.dtype), one)
    empty = jax.ShapeDtypeStruct((config.data.seq_len, cfg.cross_attention_dim), one["encoder_hidden_states"].dtype)
    return batch, empty


def compiled_memory(config, structure: UNetConfig | None = None) -> dict:
    """Compiles the train step of `config` (at train.pairs_per_device per device) and reports XLA's
    memory analysis in bytes per device, the compile time and the step's model FLOPs.

    Args:
      structure: the UNet structure; default `unet_structure(config)`.
    Returns:
      {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes",
       "total_bytes" (arguments + outputs + temporaries - aliased), "compile_s", "model_flops",
       "platform", "devices", "pairs_per_device", "attention", "compute_dtype", "param_dtype",
       "remat_policy"}.
    """
    module = unet_module(config, structure or unet_structure(config))
    params = abstract_params(module, *module.dummy_inputs(size=2**module.config.num_upsamplers, seq_len=1))
    devices = jax.device_count()
    batch, empty = abstract_batch(config, module, config.train.pairs_per_device * devices)
    step = build_train_step(config, module, params, batch, empty)
    start = time.perf_counter()
    compiled = step.compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    sizes = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
             "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
             "generated_code_bytes": m.generated_code_size_in_bytes}
    sizes["total_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    flops = step_model_flops(step, module)
    return {**{k: int(v) for k, v in sizes.items()}, "compile_s": compile_s, "model_flops": flops,
            "platform": jax.devices()[0].platform, "devices": devices,
            "pairs_per_device": config.train.pairs_per_device, "attention": config.model.attention,
            "compute_dtype": config.model.compute_dtype, "param_dtype": config.model.param_dtype,
            "remat_policy": config.model.remat_policy}
