"""PSAlign-layout export of the PSA adapter: PSAlign's key names and shapes (checked against a
layout built from diffusers' own processor order, not from our name table), export -> import ==
the tree, and lambda in the metadata of this file and of the IP-Adapter file; then
`scripts/export.py --config configs/export.py:psalign` on a saved adapter run."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import test_psa_adapter_files
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_psa_adapter_files import EMBED, assert_equal, psalign_file, random_tree

from safealign_jax import adapter
from safealign_jax.convert.adapter_files import (
    load_ip_adapter,
    load_psalign_adapter,
    psalign_names,
    read_adapter_scale,
    save_ip_adapter,
    save_psalign_adapter,
)
from safealign_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
unet = test_psa_adapter_files.unet  # fixture: (abstract params of a small UNet, attn2 paths in diffusers' order)


def metadata(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def test_export_has_psalign_names_and_shapes_and_imports_back(unet, tmp_path):
    params, order = unet
    tree = random_tree(params)
    path = tmp_path / "psa_adapter.safetensors"
    summary = save_psalign_adapter(str(path), tree, params, scale=0.6)
    assert summary == {"path": str(path), "keys": 4 + 2 * 8, "dtype": "float32", "scale": 0.6}
    written, expected = load_file(str(path)), psalign_file(tree, order)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value)
    d = tree["norm"]["scale"].shape[0]
    assert written["user_proj.proj.weight"].shape == (d, EMBED)  # (N * D, E), N = 1
    inner = tree["attn"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k_ip"].shape[1]
    assert written["psa_adapter.7.to_k_user.0.weight"].shape == (inner, d)  # j = 7: the mid block
    assert metadata(path) == {"format": "pt", "psa_scale": "0.6"}
    assert_equal(load_psalign_adapter(str(path), params), tree)
    assert read_adapter_scale(str(path)) == 0.6


def test_one_name_table_covers_every_leaf(unet):
    params, order = unet
    names = psalign_names(params)
    leaves = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(random_tree(params))}
    assert set(names) == leaves and len(set(names.values())) == len(names)
    assert names[("attn", *order[0], "to_v_ip")] == "psa_adapter.0.to_v_user.0.weight"


def test_fp16_export(unet, tmp_path):
    params, _ = unet
    tree = random_tree(params)
    save_psalign_adapter(str(tmp_path / "half.safetensors"), tree, params, dtype=np.float16)
    loaded = load_psalign_adapter(str(tmp_path / "half.safetensors"), params)
    half = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), tree)
    assert_equal(loaded, half)


def test_ip_adapter_file_keeps_lambda(unet, tmp_path):
    params, _ = unet
    tree = random_tree(params)
    save_ip_adapter(str(tmp_path / "ip.safetensors"), tree, params, scale=0.25)
    assert metadata(tmp_path / "ip.safetensors")["psa_scale"] == "0.25"
    assert read_adapter_scale(str(tmp_path / "ip.safetensors")) == 0.25
    assert_equal(load_ip_adapter(str(tmp_path / "ip.safetensors"), params), tree)
    save_ip_adapter(str(tmp_path / "default.safetensors"), tree, params)
    assert read_adapter_scale(str(tmp_path / "default.safetensors")) == 1.0
    save_file(load_file(str(tmp_path / "ip.safetensors")), str(tmp_path / "plain.safetensors"))
    assert read_adapter_scale(str(tmp_path / "plain.safetensors")) is None  # e.g. PSAlign's own files
    import torch

    torch.save({"user_proj": {}, "psa_adapter": {}}, tmp_path / "psa.bin")
    assert read_adapter_scale(str(tmp_path / "psa.bin")) is None  # a pickle has no metadata


def test_refused_exports_and_bad_metadata_are_one_line(unet, tmp_path):
    params, _ = unet
    two = random_tree(params, tokens=2)
    with pytest.raises(UserError, match=r"2 user tokens; PSAlign's attention processor reads user token 0 only"):
        save_psalign_adapter(str(tmp_path / "two.safetensors"), two, params)
    with pytest.raises(UserError, match=r"lambda=nan is not a finite number"):
        save_psalign_adapter(str(tmp_path / "nan.safetensors"), random_tree(params), params, scale=float("nan"))
    tensors = load_file(str(save_psalign_adapter(str(tmp_path / "ok.safetensors"), random_tree(params), params)["path"]))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"psa_scale": "strong"})
    with pytest.raises(UserError, match=r"bad.safetensors: metadata psa_scale='strong' is not a finite number"):
        read_adapter_scale(str(tmp_path / "bad.safetensors"))


def test_export_script_psalign_format(tiny_unet_dir, tiny_unet, tmp_path):
    from safealign_jax.runs import save_trained

    params = tiny_unet[1]
    tree = adapter.init(jax.random.key(0), params, embed_dim=EMBED)
    rng = np.random.default_rng(2)
    tree = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), tree)
    run = tmp_path / "run"
    save_trained(str(run), {"adapter": tree}, {"psa": {"scale": 0.7}}, {"path": tiny_unet_dir, "sha256": ""})
    for fmt in ("psalign", "ip-adapter"):
        out = tmp_path / fmt
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts/export.py"), "--config", f"{ROOT / 'configs/export.py'}:{fmt}",
             "--workdir", str(out), f"--config.checkpoint={run}"],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        assert summary["scale"] == 0.7 and summary["checkpoint_step"] == 0
        path = str(out / "psa_adapter.safetensors")
        assert read_adapter_scale(path) == 0.7
        load = load_psalign_adapter if fmt == "psalign" else load_ip_adapter
        assert_equal(load(path, params), tree)
    assert "user_proj.proj.weight" in load_file(str(tmp_path / "psalign" / "psa_adapter.safetensors"))
