"""The PSA adapter tree <-> a diffusers IP-Adapter safetensors file (numpy + safetensors only), and
the import of official PSAlign adapter files (`load_psalign_adapter`, layout below).

File keys (PyTorch layouts), as diffusers' `load_ip_adapter` reads them:
  image_proj.proj.weight (4 * D, E), image_proj.proj.bias (4 * D,)   Linear(E -> 4 * D)
  image_proj.norm.weight (D,), image_proj.norm.bias (D,)             LayerNorm(D)
  ip_adapter.<2 j + 1>.to_k_ip.weight / to_v_ip.weight (inner, D)    j-th attn2 in processor order

The "proj.weight" key makes diffusers build `ImageProjection`, whose token count is fixed at 4.
An adapter with N user tokens (N in 1, 2, 4) is written with every token repeated 4 / N times:
attention over r identical keys/values equals attention over one of them, and LayerNorm is
per token, so the diffusers model computes exactly the same output. N is kept in the metadata
("psa_num_tokens") so `load_ip_adapter` restores the N-token tree; files without it (ordinary
IP-Adapters) are read with N = 4. The scale lambda is stored in the metadata too ("psa_scale";
`read_adapter_scale`), since diffusers takes it separately (`pipe.set_ip_adapter_scale`).
"""

import re

import numpy as np
from flax import traverse_util

from safealign_jax.adapter import cross_attention_paths
from safealign_jax.convert.files import key_problems, read_tensors, summarise, write_safetensors
from safealign_jax.errors import UserError, check

DIFFUSERS_TOKENS = 4
TOKENS_KEY = "psa_num_tokens"
SCALE_KEY = "psa_scale"
_GROUPS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_order(path: tuple[str, ...]):
    """Sort key reproducing PyTorch module registration order (down, up, mid; list indices)."""
    parts = []
    for name in path:
        match = _INDEXED.match(name)
        parts.append((match.group(1), int(match.group(2))) if match else (name, -1))
    return (_GROUPS.get(_INDEXED.sub(r"\1", path[0]), 3), parts)


def processor_order(unet_params: dict) -> list[tuple[str, ...]]:
    """The attn2 paths in the order of diffusers' `unet.attn_processors` (IP-Adapter numbering)."""
    return sorted(cross_attention_paths(unet_params), key=_torch_order)


def ip_keys(unet_params: dict) -> dict[tuple[str, ...], int]:
    """{attn2 path: diffusers ip_adapter key id}: 1, 3, 5, ... in processor order."""
    return {p: 2 * j + 1 for j, p in enumerate(processor_order(unet_params))}


def _cross_shapes(unet_params: dict) -> dict[tuple[str, ...], tuple[int, int]]:
    flat = traverse_util.flatten_dict(unet_params)
    return {p: tuple(flat[(*p, "to_k", "kernel")].shape) for p in cross_attention_paths(unet_params)}


def _scale_metadata(scale: float) -> dict[str, str]:
    scale = float(scale)
    check(np.isfinite(scale), f"adapter scale lambda={scale!r} is not a finite number.")
    return {SCALE_KEY: repr(scale)}


def read_adapter_scale(path: str) -> float | None:
    """The adapter scale lambda stored in a safetensors adapter file's metadata (IP-Adapter or
    PSAlign layout, written here); None for files without it (use 1.0, the papers' value)."""
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return None
    metadata = read_tensors(path)[1]
    if SCALE_KEY not in metadata:
        return None
    try:
        scale = float(metadata[SCALE_KEY])
    except ValueError:
        scale = float("nan")
    check(np.isfinite(scale), f"{path}: metadata {SCALE_KEY}={metadata[SCALE_KEY]!r} is not a finite number.")
    return scale


def save_ip_adapter(
    path: str, adapter_tree: dict, unet_params: dict, dtype=np.float32, scale: float = 1.0
) -> dict:
    """Writes the adapter as a diffusers IP-Adapter file, lambda = `scale` in its metadata.
    Returns {"path", "keys", "tokens", "dtype", "scale"}.

    Load in PyTorch with `pipe.load_ip_adapter(folder, subfolder="", weight_name=file,
    image_encoder_folder=None)`, `pipe.set_ip_adapter_scale(lambda)`, then pass the (B, 1, E) user
    embedding as `ip_adapter_image_embeds=[...]` (pipeline) or `added_cond_kwargs={"image_embeds": [...]}`.
    """
    metadata = _scale_metadata(scale)
    shapes = _cross_shapes(unet_params)
    attn = {p: v for p, v in _flat_attn(adapter_tree).items()}
    check(set(attn) == set(shapes), "the adapter's attention layers do not match the UNet's cross-attentions "
                                    f"(adapter {summarise(sorted('/'.join(p) for p in set(attn) - set(shapes)))}; "
                                    f"UNet {summarise(sorted('/'.join(p) for p in set(shapes) - set(attn)))}).")
    kernel = np.asarray(adapter_tree["proj"]["kernel"], np.float32)
    bias = np.asarray(adapter_tree["proj"]["bias"], np.float32)
    d = int(adapter_tree["norm"]["scale"].shape[0])
    embed, width = kernel.shape
    n = width // d
    check(n * d == width and DIFFUSERS_TOKENS % n == 0,
          f"the adapter has {width / d:g} user tokens; diffusers' IP-Adapter ImageProjection has "
          f"{DIFFUSERS_TOKENS}, so only 1, 2 or 4 tokens can be exported.")
    repeat = DIFFUSERS_TOKENS // n
    kernel = np.repeat(kernel.reshape(embed, n, d), repeat, axis=1).reshape(embed, DIFFUSERS_TOKENS * d)
    bias = np.repeat(bias.reshape(n, d), repeat, axis=0).reshape(-1)
    tensors = {
        "image_proj.proj.weight": kernel.T,
        "image_proj.proj.bias": bias,
        "image_proj.norm.weight": np.asarray(adapter_tree["norm"]["scale"], np.float32),
        "image_proj.norm.bias": np.asarray(adapter_tree["norm"]["bias"], np.float32),
    }
    for p, key_id in ip_keys(unet_params).items():
        for name in ("to_k_ip", "to_v_ip"):
            value = np.asarray(attn[p][name], np.float32)
            check(value.shape == shapes[p], f"adapter {'/'.join(p)}/{name} has shape {value.shape}, "
                                            f"expected {shapes[p]}.")
            tensors[f"ip_adapter.{key_id}.{name}.weight"] = value.T
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    write_safetensors(path, tensors, {"format": "pt", TOKENS_KEY: str(n), **metadata})
    return {"path": path, "keys": len(tensors), "tokens": n, "dtype": np.dtype(dtype).name,
            "scale": float(scale)}


def _flat_attn(adapter_tree: dict) -> dict[tuple[str, ...], dict]:
    flat = traverse_util.flatten_dict(adapter_tree["attn"])
    out: dict[tuple[str, ...], dict] = {}
    for p, v in flat.items():
        out.setdefault(p[:-1], {})[p[-1]] = v
    return out


def _check_keys(path: str, tensors: dict, expected: dict[str, tuple], what: str) -> None:
    """UserError naming the missing, unexpected and mis-shaped keys of `tensors` against
    `expected` {key: shape} (`what`: the file kind the message names)."""
    missing = sorted(set(expected) - set(tensors))
    foreign = sorted(set(tensors) - set(expected))
    mismatched = [f"{k} has shape {tuple(tensors[k].shape)}, expected {expected[k]}"
                  for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems = key_problems(missing, foreign, mismatched, "key")
    if problems:
        raise UserError(f"{path}: not {what} for this UNet: " + "; ".join(problems) + ".")


def load_ip_adapter(path: str, unet_params: dict) -> dict:
    """Reads a diffusers IP-Adapter (ImageProjection) safetensors file as a PSA adapter tree
    (its lambda: `read_adapter_scale(path)`).

    Raises:
      UserError naming missing / foreign keys and shape mismatches in one message, or when the
      file's repeated user tokens are not identical copies.
    """
    tensors, metadata = read_tensors(path)
    shapes = _cross_shapes(unet_params)
    keys = ip_keys(unet_params)
    proj = tensors.get("image_proj.proj.weight")
    check(proj is not None and proj.ndim == 2,
          f"{path}: no 2-D image_proj.proj.weight (not a diffusers IP-Adapter with ImageProjection).")
    d = next(iter(shapes.values()))[0]
    expected = {"image_proj.proj.weight": (DIFFUSERS_TOKENS * d, proj.shape[1]),
                "image_proj.proj.bias": (DIFFUSERS_TOKENS * d,),
                "image_proj.norm.weight": (d,), "image_proj.norm.bias": (d,)}
    for p, key_id in keys.items():
        for name in ("to_k_ip", "to_v_ip"):
            expected[f"ip_adapter.{key_id}.{name}.weight"] = shapes[p][::-1]
    _check_keys(path, tensors, expected, "an IP-Adapter")
    try:
        n = int(metadata.get(TOKENS_KEY, DIFFUSERS_TOKENS))
    except ValueError:
        raise UserError(f"{path}: metadata {TOKENS_KEY}={metadata[TOKENS_KEY]!r} is not an integer.") from None
    check(n in (1, 2, 4), f"{path}: metadata {TOKENS_KEY}={n} (expected 1, 2 or 4).")
    repeat = DIFFUSERS_TOKENS // n
    kernel = np.asarray(tensors["image_proj.proj.weight"], np.float32).T.reshape(-1, DIFFUSERS_TOKENS, d)
    bias = np.asarray(tensors["image_proj.proj.bias"], np.float32).reshape(DIFFUSERS_TOKENS, d)
    check(all(np.array_equal(kernel[:, i], kernel[:, i - i % repeat]) and np.array_equal(bias[i], bias[i - i % repeat])
              for i in range(DIFFUSERS_TOKENS)),
          f"{path}: says {TOKENS_KEY}={n} but its {DIFFUSERS_TOKENS} projected tokens are not {repeat} copies each.")
    attn = {}
    for p, key_id in keys.items():
        for name in ("to_k_ip", "to_v_ip"):
            attn[(*p, name)] = np.asarray(tensors[f"ip_adapter.{key_id}.{name}.weight"], np.float32).T.copy()
    return {
        "proj": {"kernel": kernel[:, ::repeat].reshape(kernel.shape[0], n * d).copy(),
                 "bias": bias[::repeat].reshape(-1).copy()},
        "norm": {"scale": np.asarray(tensors["image_proj.norm.weight"], np.float32).copy(),
                 "bias": np.asarray(tensors["image_proj.norm.bias"], np.float32).copy()},
        "attn": traverse_util.unflatten_dict(attn),
    }


# The official PSAlign adapter file (github.com/M-E-AGI-Lab/PSAlign, psa_adapter/psa_adapter.py,
# `PSAAdapter.load_psa_adapter`): a safetensors file with flat keys, or a torch.save .bin holding
# {"user_proj": {...}, "psa_adapter": {...}}:
#   user_proj.proj.weight (N * D, E), user_proj.proj.bias (N * D,)   PSAProjection Linear
#   user_proj.norm.weight (D,), user_proj.norm.bias (D,)             LayerNorm(D)
#   psa_adapter.<j>.to_k_user.0.weight / to_v_user.0.weight (inner, D)   j-th attn2 in processor order
# `PSAAttnProcessor2_0` built with an int num_tokens holds ONE to_k_user / to_v_user and attends
# to user token 0 only, so a file with N > 1 projected tokens acts as its first token alone: the
# import keeps that token (an N = 1 tree with the same outputs), and only N = 1 trees export.
PSALIGN_PREFIXES = ("user_proj", "psa_adapter")


def psalign_names(unet_params: dict) -> dict[tuple[str, ...], str]:
    """{flat adapter-tree path: PSAlign file key}, the one table import and export share. File
    tensors are the tree's arrays, 2-D ones transposed (PyTorch Linear weights)."""
    names = {("proj", "kernel"): "user_proj.proj.weight", ("proj", "bias"): "user_proj.proj.bias",
             ("norm", "scale"): "user_proj.norm.weight", ("norm", "bias"): "user_proj.norm.bias"}
    for j, p in enumerate(processor_order(unet_params)):
        for ours, theirs in (("to_k_ip", "to_k_user"), ("to_v_ip", "to_v_user")):
            names[("attn", *p, ours)] = f"psa_adapter.{j}.{theirs}.0.weight"
    return names


def _psalign_shapes(unet_params: dict, embed: int, proj_outputs: int) -> dict[str, tuple[int, ...]]:
    """{PSAlign file key: PyTorch shape} for the UNet, embedding width E and N * D projections."""
    shapes = _cross_shapes(unet_params)
    d = next(iter(shapes.values()))[0]
    tree_shapes = {("proj", "kernel"): (embed, proj_outputs), ("proj", "bias"): (proj_outputs,),
                   ("norm", "scale"): (d,), ("norm", "bias"): (d,)}
    for p, shape in shapes.items():
        tree_shapes[("attn", *p, "to_k_ip")] = tree_shapes[("attn", *p, "to_v_ip")] = shape
    return {key: tree_shapes[path][::-1] for path, key in psalign_names(unet_params).items()}


def save_psalign_adapter(
    path: str, adapter_tree: dict, unet_params: dict, dtype=np.float32, scale: float = 1.0
) -> dict:
    """Writes an N = 1 adapter in the official PSAlign layout (above) as safetensors, lambda =
    `scale` in its metadata. Returns {"path", "keys", "dtype", "scale"}.

    Load in PyTorch with PSAlign's `PSAAdapter(pipe, psa_adapter_ckpt=file, ...)` and
    `generate(..., scale=lambda)`.
    """
    metadata = _scale_metadata(scale)
    d = int(adapter_tree["norm"]["scale"].shape[0])
    embed, width = adapter_tree["proj"]["kernel"].shape
    check(width == d, f"the adapter has {width / d:g} user tokens; PSAlign's attention processor reads "
                      "user token 0 only, so only 1-token adapters can be exported in its layout "
                      "(use format 'ip-adapter').")
    flat = traverse_util.flatten_dict(adapter_tree)
    names = psalign_names(unet_params)
    check(set(flat) == set(names), "the adapter's layers do not match the UNet's cross-attentions "
                                   f"(adapter {summarise(sorted('/'.join(p) for p in set(flat) - set(names)))}; "
                                   f"UNet {summarise(sorted('/'.join(p) for p in set(names) - set(flat)))}).")
    shapes = _psalign_shapes(unet_params, embed, width)
    tensors = {}
    for tree_path, key in names.items():
        value = np.asarray(flat[tree_path], np.float32)
        value = value.T if value.ndim == 2 else value
        check(value.shape == shapes[key], f"adapter {'/'.join(tree_path)} gives {key} shape {value.shape}, "
                                          f"expected {shapes[key]}.")
        tensors[key] = value.astype(dtype)
    write_safetensors(path, tensors, {"format": "pt", **metadata})
    return {"path": path, "keys": len(tensors), "dtype": np.dtype(dtype).name, "scale": float(scale)}


def _psalign_tensors(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Flat {key: float32 array} of a PSAlign safetensors file or nested torch.save .bin."""
    if not path.endswith((".bin", ".pt", ".pth")):
        return {k: np.asarray(v, np.float32) for k, v in read_tensors(path)[0].items()}
    check(allow_pickle, f"{path}: is a PyTorch pickle; pass allow_pickle=True to read it (only for files "
                        "you trust), or convert it to safetensors.")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a bad user file
        raise UserError(f"{path}: not a readable PyTorch weights file ({e}).") from None
    check(isinstance(state, dict) and set(PSALIGN_PREFIXES) <= set(state),
          f"{path}: expected a dict with entries {PSALIGN_PREFIXES} (a PSAlign adapter .bin).")
    return {f"{group}.{k}": v.detach().float().numpy() for group in PSALIGN_PREFIXES
            for k, v in state[group].items()}


def load_psalign_adapter(path: str, unet_params: dict, allow_pickle: bool = False) -> dict:
    """Reads an official PSAlign adapter file (layout above) as a PSA adapter tree (N = 1); its
    lambda, when written by `save_psalign_adapter`: `read_adapter_scale(path)`.

    Raises:
      UserError naming missing / foreign keys and shape mismatches in one message.
    """
    tensors = _psalign_tensors(path, allow_pickle)
    proj = tensors.get("user_proj.proj.weight")
    check(proj is not None and proj.ndim == 2,
          f"{path}: no 2-D user_proj.proj.weight (not a PSAlign adapter file).")
    d = next(iter(_cross_shapes(unet_params).values()))[0]
    check(proj.shape[0] % d == 0, f"{path}: user_proj.proj.weight has {proj.shape[0]} outputs, "
                                  f"not a multiple of the UNet's cross-attention width {d}.")
    expected = _psalign_shapes(unet_params, proj.shape[1], proj.shape[0])
    _check_keys(path, tensors, expected, "a PSAlign adapter")
    flat = {}
    for tree_path, key in psalign_names(unet_params).items():
        value = tensors[key]
        if tree_path[0] == "proj":  # N > 1 projected tokens: keep token 0 (see above)
            value = value[:d]
        flat[tree_path] = (value.T if value.ndim == 2 else value).copy()
    return traverse_util.unflatten_dict(flat)
