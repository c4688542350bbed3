"""metrics.jsonl carries the learning rate and the wall time of every step; TensorBoard events hold
the same scalars (the `tensorboard` extra), and `train.tensorboard=False` writes none."""

import json
import struct
import time

import pytest
from train_helper import tiny_config

PEAK = 1e-3


def train_run(workdir, tiny_unet_dir, cache, **overrides):
    from safealign_jax.train.loop import train

    config = tiny_config({"model.path": tiny_unet_dir, "train.compilation_cache": str(cache),
                          "optim.learning_rate": PEAK, "optim.scale_lr_by_pairs": False,
                          "train.log_every": 1, **overrides})
    return train(config, str(workdir))


def read_events(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the scalar summaries of the TFRecord event files in `folder`."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        at = 0
        while at < len(data):  # record: length (u64), crc (u32), payload, crc (u32)
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, tiny_unet_dir):
    """6 micro-steps, 2 per update, 2 warm-up updates: (workdir, records, start, end times)."""
    tmp = tmp_path_factory.mktemp("logs")
    start = time.time()
    train_run(tmp / "run", tiny_unet_dir, tmp / "cache", **{
        "train.steps": 6, "train.checkpoint_every": 6, "optim.grad_accum": 2, "optim.warmup_steps": 2})
    end = time.time()
    records = [json.loads(line) for line in (tmp / "run/metrics.jsonl").read_text().splitlines()]
    return tmp, records, start, end


def test_lr_is_the_schedules_value_of_each_steps_update(accumulated):
    _, records, _, _ = accumulated
    # updates 0, 1, 2 (micro-steps 1-2, 3-4, 5-6) of a linear warm-up 0 -> PEAK over 2 updates
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == pytest.approx([0, 0, PEAK / 2, PEAK / 2, PEAK, PEAK], rel=1e-6)


def test_wall_time_increases_within_the_run(accumulated):
    _, records, start, end = accumulated
    times = [r["wall_time"] for r in records]
    assert start < times[0] and times[-1] < end
    assert times == sorted(set(times))  # log_every=1: one fetch per step


def test_tensorboard_events_hold_the_logged_scalars(accumulated):
    pytest.importorskip("tensorboardX")
    tmp, records, _, _ = accumulated
    scalars = read_events(tmp / "run/tensorboard")
    assert "train/wall_time" not in scalars  # it is the events' own time stamp
    for tag in ("lr", "loss", "grad_norm"):
        assert scalars[f"train/{tag}"] == pytest.approx({r["step"]: r[tag] for r in records}, rel=1e-6)


@pytest.mark.slow  # a second run (~15 s)
def test_tensorboard_off(accumulated, tiny_unet_dir):
    tmp, _, _, _ = accumulated
    train_run(tmp / "off", tiny_unet_dir, tmp / "cache", **{
        "train.steps": 1, "optim.grad_accum": 2, "optim.warmup_steps": 2, "train.tensorboard": False})
    assert (tmp / "off/metrics.jsonl").is_file() and not (tmp / "off/tensorboard").exists()
