"""Small parts of the trainer: caption dropout, the base-model hash, the synthetic source."""

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.runs import hash_folder
from safealign_jax.train.data import SyntheticPairs
from safealign_jax.train.step import drop_captions


def test_caption_dropout_replaces_whole_rows():
    context = jnp.ones((256, 3, 2))
    empty = jnp.full((3, 2), -1.0)
    out = drop_captions({"encoder_hidden_states": context}, empty, 0.2, jax.random.key(0))
    out = np.asarray(out["encoder_hidden_states"])
    dropped = (out == -1).all(axis=(1, 2))
    assert ((out == 1).all(axis=(1, 2)) | dropped).all()
    assert 0.1 < dropped.mean() < 0.3
    same = drop_captions({"encoder_hidden_states": context}, empty, 0.0, jax.random.key(0))
    assert (np.asarray(same["encoder_hidden_states"]) == 1).all()


def test_base_model_hash_sees_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    first = hash_folder(str(tmp_path))
    assert hash_folder(str(tmp_path)) == first
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"y" + b"x" * 99)
    second = hash_folder(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert len({first, second, hash_folder(str(tmp_path))}) == 3


def test_synthetic_source_slices_rows_and_resumes():
    make = lambda rows: SyntheticPairs(0, 4, rows, 2, 4, 3, 8)  # noqa: E731
    full, top, bottom = make(slice(0, 4)), make(slice(0, 2)), make(slice(2, 4))
    next(full), next(top), next(bottom)
    a, b, c = next(full), next(top), next(bottom)
    for key in a:
        np.testing.assert_array_equal(a[key], np.concatenate([b[key], c[key]]))
    resumed = make(slice(0, 4))
    resumed.set_state(full.get_state())
    np.testing.assert_array_equal(next(resumed)["latents_w"], next(full)["latents_w"])
