"""safealign_jax.runs: the parent-folder search, and one writer of the checkpoint layout read by
`read_trainable` whether a trainer or a merge wrote it."""

import os

import numpy as np
import pytest

from safealign_jax import UserError
from safealign_jax.runs import (
    Checkpoints,
    folder_holding,
    pipeline_folder,
    read_trainable,
    save_trained,
)
from safealign_jax.trainable import Trainable

TREE = {"lora": {"blk": {"to_q": {"a": np.ones((3, 2), np.float32), "b": np.full((2, 4), 0.5, np.float32)}}}}
BASE = {"path": "unet", "sha256": "0"}


def test_folder_holding_looks_in_the_folder_then_its_parent(tmp_path):
    pipe, unet = tmp_path / "pipe", tmp_path / "pipe" / "unet"
    os.makedirs(unet)
    (pipe / "model_index.json").write_text("{}")
    (unet / "config.json").write_text("{}")
    assert pipeline_folder(str(pipe)) == str(pipe)
    assert pipeline_folder(str(unet)) == str(pipe)
    assert pipeline_folder(str(unet) + "/") == str(pipe)
    assert folder_holding(str(unet), "config.json") == str(unet)
    assert pipeline_folder(str(tmp_path)) is None and pipeline_folder("") is None


def test_trainer_and_merge_write_one_layout(tmp_path):
    ckpts = Checkpoints(str(tmp_path / "train"), keep=1, async_save=False)
    ckpts.save(2, {"step": np.int32(2), "trainable": TREE}, {"lora": {"rank": 2, "alpha": 2.0}}, {"index": 2}, BASE)
    ckpts.close()
    folder = save_trained(str(tmp_path / "merge"), Trainable(TREE), {}, BASE, step=2)
    assert folder == str(tmp_path / "merge" / "checkpoints" / "2")
    trained, merged = read_trainable(str(tmp_path / "train")), read_trainable(folder)
    assert sorted(os.listdir(folder)) == sorted(set(os.listdir(str(tmp_path / "train" / "checkpoints" / "2"))) - {"data"})
    for run in (trained, merged):
        assert run["step"] == 2 and run["base_model"] == BASE
        np.testing.assert_array_equal(run["trainable"]["lora"]["blk"]["to_q"]["b"], TREE["lora"]["blk"]["to_q"]["b"])
    assert merged["config"] == {"trainable": {"kind": "lora", "scales": {"lora": 1.0}}}
    with pytest.raises(UserError, match="already holds a checkpoint 2"):
        save_trained(str(tmp_path / "merge"), Trainable(TREE), {}, BASE, step=2)
