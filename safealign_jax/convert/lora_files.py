"""LoRA trees <-> PyTorch LoRA files (PEFT / diffusers and kohya), numpy + safetensors only.

Module names come from `DIFFUSERS_NAMES` (the one Flax path <-> diffusers name table): the LoRA
tree path "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q" is the diffusers module
"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q". With a (in, r), b (r, out), s = alpha/r:

  PEFT / diffusers >= 0.35   unet.<module>.lora_A.weight (r, in) = a.T,  .lora_B.weight (out, r) = b.T,
                             metadata "lora_adapter_metadata" = {"unet.r", "unet.lora_alpha", ...}
  kohya (sd-scripts)         lora_unet_<module with "_">.lora_down.weight (r, in), .lora_up.weight
                             (out, r), .alpha () = alpha. Block names as sd-scripts writes them:
                             diffusers-style for SD1.x / 2.x (down_blocks_0_attentions_0_...), the
                             LDM (sgm) numbering for SDXL (input_blocks_4_1_..., middle_block_1_...,
                             output_blocks_2_1_...; `ldm_attention_blocks`). Metadata: ss_network_*
                             and ss_base_model_version as sd-scripts, modelspec.* (Stability AI's
                             ModelSpec 1.0.0) as ComfyUI / A1111 read them (`kohya_metadata`).
  old diffusers (read only)  unet.<module>.lora.down/up.weight, unet.<attn>.processor.to_q_lora.down.weight
"""

import datetime
import json
import os
import re
from collections import Counter

import numpy as np
from flax import traverse_util

from safealign_jax.convert.files import read_tensors, summarise, write_safetensors
from safealign_jax.convert.names import DIFFUSERS_NAMES
from safealign_jax.errors import UserError, check

METADATA_KEY = "lora_adapter_metadata"
_OLD_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def module_name(path: tuple[str, ...]) -> str:
    """The diffusers module name of the Dense layer at Flax module path `path`."""
    return DIFFUSERS_NAMES.torch_name((*path, "kernel")).removesuffix(".weight")


def _kohya_name(module: str, ldm_blocks: dict[str, str] | None = None) -> str:
    """lora_unet_<module with "_">; with `ldm_blocks` its attention block in the LDM numbering."""
    if ldm_blocks:
        parts = module.split(".")
        block = ".".join(parts[:4] if parts[0] != "mid_block" else parts[:3])
        if block in ldm_blocks:
            module = ".".join([ldm_blocks[block], *parts[len(block.split(".")):]])
    return "lora_unet_" + module.replace(".", "_")


def ldm_attention_blocks(down_layers: list[int], up_layers: list[int]) -> dict[str, str]:
    """{diffusers attention block: its name in the LDM / sgm UNet}, e.g. for SDXL
    "down_blocks.1.attentions.0" -> "input_blocks.4.1", "mid_block.attentions.0" -> "middle_block.1",
    "up_blocks.0.attentions.2" -> "output_blocks.2.1".

    `down_layers[b]` / `up_layers[b]`: resnets in down / up block b. input_blocks counts conv_in (0),
    each layer and each downsampler (every down block but the last); output_blocks counts the layers.
    """
    names, index = {"mid_block.attentions.0": "middle_block.1"}, 1
    for b, layers in enumerate(down_layers):
        for i in range(layers):
            names[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{index}.1"
            index += 1
        index += b < len(down_layers) - 1
    index = 0
    for b, layers in enumerate(up_layers):
        for i in range(layers):
            names[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{index}.1"
            index += 1
    return names


def _block_layers_of_config(unet_config: dict) -> tuple[list[int], list[int]]:
    """(resnets per down block, per up block) of a diffusers UNet config.json."""
    blocks = len(unet_config["down_block_types"])
    per_block = unet_config.get("layers_per_block", 2)
    down = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * blocks
    return down, [n + 1 for n in reversed(down)]


def _block_layers_of_params(params: dict) -> tuple[list[int], list[int]]:
    """(resnets per down block, per up block) of a UNet params tree."""
    counts: dict[str, dict[int, set]] = {"down_blocks": {}, "up_blocks": {}}
    for path in traverse_util.flatten_dict(params):
        if len(path) > 2 and path[1].startswith("resnets_"):
            kind, _, b = path[0].rpartition("_")
            if kind in counts:
                counts[kind].setdefault(int(b), set()).add(path[1])
    return tuple([len(counts[k][b]) for b in sorted(counts[k])] for k in ("down_blocks", "up_blocks"))


def is_sdxl(unet_config: dict) -> bool:
    """An SDXL-family UNet (added text/time conditioning)."""
    return unet_config.get("addition_embed_type") == "text_time"


def base_model_version(unet_config: dict, prediction_type: str = "epsilon") -> str:
    """sd-scripts' ss_base_model_version: "sdxl_base_v1-0", else "sd_v2" (1024-wide cross-attention)
    or "sd_v1", with "_v" appended for v-prediction."""
    if is_sdxl(unet_config):
        return "sdxl_base_v1-0"
    version = "sd_v2" if unet_config.get("cross_attention_dim") == 1024 else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" else "")


def kohya_metadata(unet_config: dict, rank: int, alpha: float, title: str,
                   prediction_type: str = "epsilon") -> dict[str, str]:
    """The safetensors metadata sd-scripts writes for a UNet LoRA: ss_network_module / dim / alpha,
    ss_base_model_version, ss_v2, and the ModelSpec keys (modelspec.sai_model_spec "1.0.0",
    architecture "<base>/lora", implementation, title, resolution = sample_size * 8 pixels, date,
    prediction_type) ComfyUI and A1111 show."""
    version = base_model_version(unet_config, prediction_type)
    v_pred = prediction_type == "v_prediction"
    if is_sdxl(unet_config):
        architecture, implementation = "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"
    else:
        architecture = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") \
            if version.startswith("sd_v2") else "stable-diffusion-v1"
        implementation = "diffusers"
    size = int(unet_config.get("sample_size", 64)) * 8
    return {
        "format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)), "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation, "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}", "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
    }


def _layers(lora_tree: dict) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{module path: (a (in, r), b (r, out))} as float32 numpy arrays."""
    flat = traverse_util.flatten_dict(lora_tree)
    layers = {}
    for path, a in flat.items():
        if path[-1] == "a":
            b = flat.get((*path[:-1], "b"))
            check(b is not None, f"LoRA tree: {'/'.join(path[:-1])} has 'a' but no 'b'.")
            layers[path[:-1]] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
    check(bool(layers), "the LoRA tree is empty (expected {path: {'a': (in, r), 'b': (r, out)}}).")
    return layers


def _summary(path, fmt, tensors, rank, alpha, dtype) -> dict:
    return {"path": path, "format": fmt, "keys": len(tensors), "rank": rank, "alpha": float(alpha),
            "scale": float(alpha) / rank, "dtype": np.dtype(dtype).name}


def save_peft_lora(path: str, lora_tree: dict, rank: int, alpha: float, prefix: str = "unet",
                   dtype=np.float32) -> dict:
    """Writes the LoRA as a PEFT / diffusers safetensors file (`pipe.load_lora_weights(path)`).

    The metadata is what diffusers' `_save_lora_weights` writes ({"format": "pt",
    "lora_adapter_metadata": json.dumps({f"{prefix}.r": r, f"{prefix}.lora_alpha": alpha, ...},
    indent=2, sort_keys=True)}), so diffusers >= 0.35 restores s = alpha / rank from it.
    Returns {"path", "format", "keys", "rank", "alpha", "scale", "dtype"}.
    """
    layers = _layers(lora_tree)
    _check_rank(layers, rank)
    tensors, modules = {}, []
    for p, (a, b) in layers.items():
        name = module_name(p)
        modules.append(name)
        tensors[f"{prefix}.{name}.lora_A.weight"] = a.T.astype(dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = b.T.astype(dtype)
    config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(modules),
              "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False}
    packed = {f"{prefix}.{k}": v for k, v in config.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    write_safetensors(path, tensors, metadata)
    return _summary(path, "peft", tensors, rank, alpha, dtype)


def save_kohya_lora(path: str, lora_tree: dict, rank: int, alpha: float, *, unet_config: dict,
                    title: str = "", prediction_type: str = "epsilon", dtype=np.float32) -> dict:
    """Writes the LoRA as a kohya (sd-scripts) safetensors file for the base UNet of `unet_config`
    (its config.json): key names and metadata as sd-scripts writes them (module docstring,
    `kohya_metadata`; `title` defaults to the file name). `prediction_type`: the base scheduler's.

    Only attention-block layers (inside `attentions_i`) are written: diffusers' kohya converter
    mis-renames some other layers (e.g. SDXL add_embedding), so those raise a UserError.
    """
    layers = _layers(lora_tree)
    _check_rank(layers, rank)
    outside = [module_name(p) for p in layers if not any(m.startswith("attentions_") for m in p)]
    check(not outside, f"kohya export supports only layers inside attention blocks; these are not: "
                       f"{summarise(outside)} (export them in the peft format).")
    ldm_blocks = ldm_attention_blocks(*_block_layers_of_config(unet_config)) if is_sdxl(unet_config) else None
    tensors = {}
    for p, (a, b) in layers.items():
        key = _kohya_name(module_name(p), ldm_blocks)
        tensors[f"{key}.lora_down.weight"] = a.T.astype(dtype)
        tensors[f"{key}.lora_up.weight"] = b.T.astype(dtype)
        tensors[f"{key}.alpha"] = np.asarray(alpha, dtype)
    title = title or os.path.splitext(os.path.basename(path))[0]
    write_safetensors(path, tensors, kohya_metadata(unet_config, rank, alpha, title, prediction_type))
    return _summary(path, "kohya", tensors, rank, alpha, dtype)


def _check_rank(layers, rank) -> None:
    wrong = [module_name(p) for p, (a, _) in layers.items() if a.shape[1] != rank]
    check(not wrong, f"LoRA layers {summarise(wrong)} do not have rank {rank}.")


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """file key -> (format, module name as in the file, role in {"a", "b", "alpha"}) or None."""
    for suffix, role in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
        if key.endswith(suffix):
            return "peft", key.removesuffix(suffix).removeprefix("unet."), role
    if key.startswith("lora_unet_"):
        for suffix, role in ((".lora_down.weight", "a"), (".lora_up.weight", "b"), (".alpha", "alpha")):
            if key.endswith(suffix):
                return "kohya", key.removesuffix(suffix), role
        return None
    match = _OLD_PROCESSOR.match(key)
    if match:
        attn, proj, direction = match.groups()
        proj = "to_out.0" if proj == "to_out" else proj
        return "diffusers-old", f"{attn}.{proj}".removeprefix("unet."), "a" if direction == "down" else "b"
    for suffix, role in ((".lora.down.weight", "a"), (".lora.up.weight", "b")):
        if key.endswith(suffix):
            return "diffusers-old", key.removesuffix(suffix).removeprefix("unet."), role
    return None


def _peft_metadata(metadata: dict[str, str], source: str) -> dict:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({e}).") from None
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    patterns = {k: config.get(k) for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    check(not patterns, f"{source}: per-module {sorted(patterns)} in the LoRA metadata are not supported.")
    return config


def load_lora_file(path: str, params: dict, allow_pickle: bool = False) -> tuple[dict, int, float]:
    """Reads a PEFT / diffusers, old-diffusers or kohya UNet LoRA file for the UNet `params`.

    Returns (lora_tree, rank, alpha) with a (in, r), b (r, out) float32 such that
    `Trainable({"lora": tree}, {"lora": alpha / rank})` reproduces the file. rank and alpha are the most common
    per-layer values; a layer with another scale alpha_i / r_i has its b rescaled to match.
    Raises:
      UserError naming foreign keys (not a LoRA of a Dense layer of `params`), layers with a
      missing half, and shape mismatches, all in one message.
    """
    tensors, metadata = read_tensors(path, allow_pickle)
    check(bool(tensors), f"{path}: contains no tensors.")
    flat = traverse_util.flatten_dict(params)
    kernels = {p[:-1]: tuple(v.shape) for p, v in flat.items() if p[-1] == "kernel" and len(v.shape) == 2}
    by_name = {module_name(p): p for p in kernels}
    ldm_blocks = ldm_attention_blocks(*_block_layers_of_params(params))
    by_name.update({_kohya_name(module_name(p)): p for p in kernels})
    by_name.update({_kohya_name(module_name(p), ldm_blocks): p for p in kernels})
    parts: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    foreign, formats = [], set()
    for key, value in tensors.items():
        parsed = _parse_key(key)
        if parsed is None or parsed[1] not in by_name:
            foreign.append(key)
            continue
        fmt, name, role = parsed
        formats.add(fmt)
        parts.setdefault(by_name[name], {})[role] = np.asarray(value, np.float32)
    problems = []
    if foreign:
        problems.append(f"{len(foreign)} key(s) that are not LoRA weights of a Dense layer of this UNet: "
                        f"{summarise(sorted(foreign))}")
    if len(formats) > 1:
        problems.append(f"a mix of formats {sorted(formats)}")
    incomplete = [module_name(p) for p, d in parts.items() if not {"a", "b"} <= set(d)]
    if incomplete:
        problems.append(f"layers without both down (A) and up (B) weights: {summarise(incomplete)}")
    mismatched = []
    for p, d in parts.items():
        if {"a", "b"} <= set(d):
            fan_in, fan_out = kernels[p]
            down, up = d["a"], d["b"]
            if down.ndim != 2 or up.ndim != 2 or down.shape[1] != fan_in or up.shape[0] != fan_out \
                    or down.shape[0] != up.shape[1]:
                mismatched.append(f"{module_name(p)} has down {down.shape} / up {up.shape}, expected "
                                  f"(r, {fan_in}) / ({fan_out}, r)")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {summarise(mismatched, 3)}")
    if problems:
        raise UserError(f"{path}: not a LoRA for this UNet: " + "; ".join(problems) + ".")
    config = _peft_metadata(metadata, path) if "peft" in formats else {}
    ranks = {p: d["a"].shape[0] for p, d in parts.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alphas = {p: float(np.asarray(d["alpha"]).reshape(())) if "alpha" in d
              else float(config.get("lora_alpha", ranks[p])) for p, d in parts.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    scale = alpha / rank
    tree = {}
    for p, d in parts.items():
        tree[(*p, "a")] = d["a"].T.copy()
        tree[(*p, "b")] = d["b"].T * ((alphas[p] / ranks[p]) / scale) if alphas[p] / ranks[p] != scale \
            else d["b"].T.copy()
    return traverse_util.unflatten_dict(tree), int(rank), float(alpha)
