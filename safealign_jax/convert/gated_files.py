"""A user-gated PSA tree (`safealign_jax.gated`) <-> a folder of diffusers-loadable files.

    <folder>/<slug>.safetensors     one PEFT LoRA per category (`lora_files.save_peft_lora`), the
                                    factors a_c, b_c zero-padded to the largest layer rank R,
                                    alpha = R (scale 1), so diffusers adds exactly a_c b_c
    <folder>/psa_gate.safetensors   weight (C, E), bias (C,): the gate as a torch.nn.Linear(E -> C);
                                    metadata {"format": "safealign_jax.psa_gate", "categories":
                                    json list of the slugs (file stems = adapter names, gate order),
                                    "category_names": json list of the original names, "embed_dim": E,
                                    "gates": "soft" | "hard" (psa.gated.hard: thresholded at 0.5)}

In diffusers a user u is served by loading every category as an adapter and setting the adapter
weights to the gates g = sigmoid(weight @ u + bias):

    gate = load_file("out/psa_gate.safetensors")
    with safe_open("out/psa_gate.safetensors", "pt") as f:
        cats = json.loads(f.metadata()["categories"])
        hard = f.metadata().get("gates") == "hard"
    g = torch.sigmoid(gate["weight"] @ e + gate["bias"])                  # e: (E,) user embedding
    g = (g > 0.5).float() if hard else g
    for c in cats:
        pipe.load_lora_weights("out", weight_name=f"{c}.safetensors", adapter_name=c)
    pipe.set_adapters(cats, adapter_weights=g.tolist())
"""

import json
import os
import re

import numpy as np
from flax import traverse_util

from safealign_jax.convert.files import read_tensors, write_safetensors
from safealign_jax.convert.lora_files import load_lora_file, save_peft_lora
from safealign_jax.errors import UserError, check

GATE_FILE = "psa_gate.safetensors"
FORMAT = "safealign_jax.psa_gate"


def slugs(names: list[str]) -> list[str]:
    """File stems / adapter names for category names: lower case, runs of other characters -> "_",
    made unique with a numeric suffix ("Self-Harm" -> "self_harm")."""
    out = []
    for i, name in enumerate(names):
        slug = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or f"category_{i}"
        base, n = slug, 2
        while slug in out:
            slug, n = f"{base}_{n}", n + 1
        out.append(slug)
    return out


def _layers(tree: dict) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{layer path: (a (C, in, r), b (C, r, out))} as float32 numpy."""
    flat = traverse_util.flatten_dict(tree["experts"])
    return {p[:-1]: (np.asarray(a, np.float32), np.asarray(flat[(*p[:-1], "b")], np.float32))
            for p, a in flat.items() if p[-1] == "a"}


def save_gated(folder: str, tree: dict, categories: list[str], dtype=np.float32, hard: bool = False) -> dict:
    """Writes the gated tree as the files above into `folder` (created if needed); `hard`: the
    gates act thresholded (metadata "gates": "hard").

    Returns {"folder", "categories" (slugs), "rank", "embed_dim", "files"}.
    """
    kernel = np.asarray(tree["gate"]["kernel"], np.float32)
    bias = np.asarray(tree["gate"]["bias"], np.float32)
    embed_dim, count = kernel.shape
    check(len(categories) == count, f"gated export: {len(categories)} category names for {count} gates.")
    layers = _layers(tree)
    check(bool(layers), "gated export: the tree has no expert layers.")
    rank = max(a.shape[2] for a, _ in layers.values())
    names = slugs(categories)
    os.makedirs(folder, exist_ok=True)
    files = []
    for c, slug in enumerate(names):
        lora_tree = {}
        for path, (a, b) in layers.items():
            pad = rank - a.shape[2]
            lora_tree[(*path, "a")] = np.pad(a[c], ((0, 0), (0, pad)))
            lora_tree[(*path, "b")] = np.pad(b[c], ((0, pad), (0, 0)))
        files.append(f"{slug}.safetensors")
        save_peft_lora(os.path.join(folder, files[-1]), traverse_util.unflatten_dict(lora_tree), rank,
                       float(rank), dtype=dtype)
    metadata = {"format": FORMAT, "categories": json.dumps(names),
                "category_names": json.dumps([str(n) for n in categories]), "embed_dim": str(embed_dim),
                "gates": "hard" if hard else "soft"}
    write_safetensors(os.path.join(folder, GATE_FILE),
                      {"weight": kernel.T.astype(dtype), "bias": bias.astype(dtype)}, metadata)
    files.append(GATE_FILE)
    return {"folder": folder, "categories": names, "rank": int(rank), "embed_dim": int(embed_dim), "files": files}


def read_gate(folder: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(weight (C, E), bias (C,), slugs, category names) of `folder`/psa_gate.safetensors."""
    path = os.path.join(folder, GATE_FILE)
    check(os.path.isfile(path), f"{folder}: no {GATE_FILE} (not a gated PSA export).")
    tensors, metadata = read_tensors(path)
    check(metadata.get("format") == FORMAT, f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}.")
    try:
        names = json.loads(metadata["categories"])
        originals = json.loads(metadata.get("category_names", metadata["categories"]))
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: metadata 'categories' is missing or not a JSON list ({e}).") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    check(weight is not None and bias is not None and weight.ndim == 2 and bias.shape == (weight.shape[0],)
          and weight.shape[0] == len(names) == len(originals),
          f"{path}: expected weight (C, E) and bias (C,) with C = {len(names)} categories.")
    return np.asarray(weight, np.float32), np.asarray(bias, np.float32), list(names), list(originals)


def load_gated(folder: str, unet_params: dict) -> dict:
    """Reads a folder written by `save_gated` back as a gated tree for the UNet `unet_params`
    (factors as stored: rank R at every layer, the LoRA scale folded into b)."""
    weight, bias, names, _ = read_gate(folder)
    per_category = []
    for slug in names:
        lora_tree, rank, alpha = load_lora_file(os.path.join(folder, f"{slug}.safetensors"), unet_params)
        flat = traverse_util.flatten_dict(lora_tree)
        per_category.append({p: v * (alpha / rank) if p[-1] == "b" else v for p, v in flat.items()})
    paths = set(per_category[0])
    for slug, flat in zip(names, per_category, strict=True):
        check(set(flat) == paths, f"{folder}/{slug}.safetensors adapts other layers than {names[0]}.safetensors.")
        shapes = {p: v.shape for p, v in flat.items()}
        check(shapes == {p: v.shape for p, v in per_category[0].items()},
              f"{folder}/{slug}.safetensors has other ranks than {names[0]}.safetensors.")
    experts = {p: np.stack([flat[p] for flat in per_category]) for p in sorted(paths)}
    return {"gate": {"kernel": weight.T.copy(), "bias": bias}, "experts": traverse_util.unflatten_dict(experts)}
