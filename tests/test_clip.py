"""CLIP text encoder port parity against transformers (SD1 / SD2 / SDXL forms), tokenizer, errors."""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch_reference import randomise, relative_error
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchCLIP
from transformers import CLIPTextModelWithProjection as TorchCLIPProjection

from safealign_jax import UserError
from safealign_jax.models import load_text_encoder, load_tokenizer, param_count, tokenize
from safealign_jax.tiny_pipeline import write_clip_tokenizer

VOCAB, BOS, EOS = 1000, 998, 999
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=BOS,
    pad_token_id=1,
)
# SD1.x: CLIP ViT-L form, quick_gelu, legacy eos_token_id 2 (pool at the largest id).
# SD2.x: OpenCLIP ViT-H in CLIPTextModel form, gelu, pool at the first eos id.
# SDXL text_encoder_2: OpenCLIP bigG with projection, gelu, legacy eos id.
FAMILIES = {
    "sd1": (TorchCLIP, dict(BASE, hidden_act="quick_gelu", eos_token_id=2)),
    "sd2": (TorchCLIP, dict(BASE, hidden_act="gelu", eos_token_id=EOS)),
    "sdxl2": (TorchCLIPProjection, dict(BASE, hidden_act="gelu", eos_token_id=2, projection_dim=24)),
}


def token_ids(pad: int, length: int = 16, seed: int = 0) -> np.ndarray:
    """Rows <bos> words <eos> <pad>... with the eos at different positions (the third row full),
    and a fourth row of words without eos, where the two pooling rules pick different positions."""
    rng = np.random.default_rng(seed)
    ids = np.full((4, length), pad, np.int32)
    for row, n_words in enumerate([3, 9, length - 2]):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n_words] = rng.integers(3, 990, n_words)
        ids[row, 1 + n_words] = EOS
    ids[3] = rng.integers(3, 990, length)
    return ids


def torch_outputs(model, ids: np.ndarray, mask: np.ndarray | None = None) -> dict:
    kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
    ids_t = torch.from_numpy(ids).long()
    with torch.no_grad():
        text_model = model.text_model if isinstance(model, TorchCLIPProjection) else model
        out = text_model(ids_t, output_hidden_states=True, **kwargs)
        result = {
            "last_hidden_state": out.last_hidden_state.numpy(),
            "penultimate_hidden_state": out.hidden_states[-2].numpy(),
            "pooled_output": out.pooler_output.numpy(),
        }
        if isinstance(model, TorchCLIPProjection):
            result["text_embeds"] = model(ids_t, **kwargs).text_embeds.numpy()
    return result


def jax_outputs(folder: str, ids: np.ndarray, mask: np.ndarray | None = None, **load_kw) -> dict:
    module, params = load_text_encoder(folder, **load_kw)
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    return {k: np.asarray(v) for k, v in out._asdict().items() if v is not None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (torch model, folder)} of tiny random text encoders saved as safetensors."""
    out = {}
    for name, (cls, config) in FAMILIES.items():
        torch.manual_seed(0)
        model = randomise(cls(TorchConfig(**config)))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


def assert_parity(ours: dict, reference: dict, tol: float = 1e-4) -> None:
    assert set(ours) == set(reference)
    for key in reference:
        err = relative_error(ours[key], reference[key])
        print(f"  {key}: relative max abs error {err:.2e}")
        assert err <= tol, key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_transformers(saved, family):
    model, folder = saved[family]
    ids = token_ids(pad=EOS if family != "sdxl2" else 0)
    print(family)
    assert_parity(jax_outputs(folder, ids), torch_outputs(model, ids))


def test_parity_with_padding_mask(saved):
    model, folder = saved["sd2"]
    ids = token_ids(pad=1)
    mask = (np.cumsum(ids == EOS, axis=1) - (ids == EOS) == 0).astype(np.int32)  # up to the eos
    assert_parity(jax_outputs(folder, ids, mask), torch_outputs(model, ids, mask))


def test_param_count_matches_torch(saved):
    for model, folder in saved.values():
        _, params = load_text_encoder(folder)
        assert param_count(params) == sum(p.numel() for p in model.parameters())


def test_pipeline_folder_fp16_and_legacy_names(saved, tmp_path):
    """text_encoder/ (fp16 variant, hub-style `text_model.` names with the position_ids buffer)
    and text_encoder_2/ (with projection) of one pipeline folder."""
    model = copy.deepcopy(saved["sd1"][0]).half()
    model.save_pretrained(tmp_path / "text_encoder", variant="fp16")
    weights = tmp_path / "text_encoder" / "model.fp16.safetensors"
    tensors = {"text_model." + k: v for k, v in load_file(weights).items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(tensors, weights)
    model_2, folder_2 = saved["sdxl2"]
    os.symlink(folder_2, tmp_path / "text_encoder_2")
    (tmp_path / "model_index.json").write_text("{}")

    ids = token_ids(pad=EOS)
    # The same fp16 weights on both sides, float32 compute.
    assert_parity(jax_outputs(str(tmp_path), ids), torch_outputs(model.float(), ids))
    assert_parity(jax_outputs(str(tmp_path), ids, subfolder="text_encoder_2"), torch_outputs(model_2, ids))


def test_bf16_compute_is_close(saved):
    import jax.numpy as jnp

    model, folder = saved["sdxl2"]
    ids = token_ids(pad=0)
    ours = jax_outputs(folder, ids, dtype=jnp.bfloat16)
    reference = torch_outputs(model, ids)
    for key in reference:
        assert relative_error(ours[key], reference[key]) <= 5e-2, key


def _error(folder, **kw) -> str:
    with pytest.raises(UserError) as info:
        load_text_encoder(str(folder), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_component_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    message = _error(tmp_path, subfolder="text_encoder_2")
    assert str(tmp_path) in message and "text_encoder_2/" in message


def test_error_unsupported_config_value(saved, tmp_path):
    folder = saved["sd1"][1]
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = _error(tmp_path)
    assert "config.json" in message and "hidden_act='relu'" in message


def test_error_sequence_too_long(saved):
    module, params = load_text_encoder(saved["sd1"][1])
    with pytest.raises(UserError, match="max_position_embeddings=16"):
        module.apply({"params": params}, np.zeros((1, 17), np.int32))


@pytest.fixture(scope="module")
def tokenizer_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    write_clip_tokenizer(folder / "tokenizer", model_max_length=12)
    return str(folder)


def test_tokenize_pads_and_truncates(tokenizer_pipeline):
    tokenizer = load_tokenizer(tokenizer_pipeline)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenize(tokenizer, ["the cat", "a photo of the cat on the mat"])
    assert ids.dtype == np.int32 and ids.shape == (2, 12)
    assert ids[0, :4].tolist() == [bos, tokenizer.convert_tokens_to_ids("the</w>"), tokenizer.convert_tokens_to_ids("cat</w>"), eos]
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert ids[1, 0] == bos and ids[1, -1] == eos and (ids[1, 1:-1] != eos).all()  # truncated
    assert tokenize(tokenizer, "the cat", max_length=6).shape == (1, 6)


def test_tokenizer_component_folder_and_error(tokenizer_pipeline, tmp_path):
    tokenizer = load_tokenizer(os.path.join(tokenizer_pipeline, "tokenizer"))
    assert tokenizer.model_max_length == 12
    with pytest.raises(UserError, match="tokenizer_2/"):
        load_tokenizer(tokenizer_pipeline, subfolder="tokenizer_2")


def test_import_does_not_load_torch():
    code = "import safealign_jax.models.clip, safealign_jax.models, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
