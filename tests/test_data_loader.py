"""grain loader: per-process shards, exact resume from iterator state, seeded flips shared by the
pair (or independent), decoding, the cached-array path, caption dropout."""

import grain
import numpy as np
import pytest
import test_data_fixtures as F

from safealign_jax import UserError
from safealign_jax.data import images, loader

N = 24


@pytest.fixture(scope="module")
def examples():
    return [
        {"id": f"{i:02d}", "caption": f"caption {i}",
         "preferred": F.image_bytes(2 * i, "PNG"), "rejected": F.image_bytes(2 * i + 1, "PNG")}
        for i in range(N)
    ]


def batches(examples, n=None, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 7, "image_size": F.SIZE, "num_threads": 2, **kwargs}
    it = iter(loader.make_loader(examples, **kwargs))
    return list(it) if n is None else [next(it) for _ in range(n)]


def shard(index, count=2):
    return grain.sharding.ShardOptions(shard_index=index, shard_count=count)


def test_batches_are_numpy_dicts(examples):
    (batch,) = batches(examples, 1, shard=shard(0, 1))
    assert batch["preferred"].shape == (4, F.SIZE, F.SIZE, 3) and batch["preferred"].dtype == np.float32
    assert batch["rejected"].min() >= -1.0 and batch["rejected"].max() <= 1.0
    assert batch["id"].shape == (4,) and batch["caption"].dtype.kind == "U"
    assert len(batches(examples, 1)[0]["id"]) == 4  # default: this JAX process (1 of 1)


def test_processes_get_disjoint_slices_of_each_global_batch(examples):
    one = batches(examples, num_epochs=1, shard=shard(0, 1), flip="shared")
    p0 = batches(examples, num_epochs=1, shard=shard(0), flip="shared")
    p1 = batches(examples, num_epochs=1, shard=shard(1), flip="shared")
    assert len(one) == N // 4 and len(p0) == len(p1) == N // 4
    assert all(len(b["id"]) == 2 for b in p0 + p1)
    ids0 = {i for b in p0 for i in b["id"]}
    ids1 = {i for b in p1 for i in b["id"]}
    assert not ids0 & ids1 and ids0 | ids1 == {e["id"] for e in examples}
    for g, a, b in zip(one, p0, p1, strict=True):  # step k: process rows of the k-th global batch
        for key in ("id", "caption", "preferred", "rejected"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key])


def test_epochs_reshuffle_and_cut_to_whole_global_batches(examples):
    two = batches(examples[:22], num_epochs=2, shard=shard(0, 1))
    assert len(two) == 44 // 4
    first = [i for b in two[:5] for i in b["id"]]
    assert len(set(first)) == 20  # no repeats inside the first epoch
    assert batches(examples, num_epochs=1, shard=shard(0, 1), shuffle=False)[0]["id"].tolist() == [
        "00", "01", "02", "03"]


def test_resume_from_iterator_state_continues_exactly(examples):
    ds = loader.make_loader(examples, global_batch_size=4, seed=3, image_size=F.SIZE,
                            shard=shard(1), num_threads=2, flip="independent")
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (6 steps per epoch)
    resumed = iter(ds)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(4)], strict=True):
        assert want["id"].tolist() == got["id"].tolist()
        np.testing.assert_array_equal(want["preferred"], got["preferred"])
        np.testing.assert_array_equal(want["rejected"], got["rejected"])


def flip_flags(examples, mode):
    """{id: (preferred flipped, rejected flipped)} over one epoch, against the unflipped run."""
    plain = batches(examples, num_epochs=1, shard=shard(0, 1), flip="none")
    flipped = batches(examples, num_epochs=1, shard=shard(0, 1), flip=mode)
    flags = {}
    for a, b in zip(plain, flipped, strict=True):
        assert a["id"].tolist() == b["id"].tolist()
        for k, i in enumerate(a["id"]):
            pair = []
            for key in ("preferred", "rejected"):
                if np.array_equal(a[key][k], b[key][k]):
                    pair.append(False)
                else:
                    np.testing.assert_array_equal(images.hflip(a[key][k]), b[key][k])
                    pair.append(True)
            flags[i] = tuple(pair)
    return flags


def test_flip_shared_by_the_pair_by_default(examples):
    flags = flip_flags(examples, "shared")
    assert all(p == r for p, r in flags.values())
    assert {p for p, _ in flags.values()} == {True, False}


def test_independent_flips_option(examples):
    flags = flip_flags(examples, "independent")
    assert any(p != r for p, r in flags.values())


def test_cached_arrays_pass_through_and_flip(examples):
    latents = [
        {"id": f"{i:02d}", "caption": "c", "preferred": np.arange(32, dtype=np.float32).reshape(2, 4, 4) + i,
         "rejected": -np.arange(32, dtype=np.float32).reshape(2, 4, 4) - i}
        for i in range(8)
    ]
    got = batches(latents, num_epochs=1, shard=shard(0, 1), image_size=None)
    for batch in got:
        for k, i in enumerate(batch["id"]):
            base = latents[int(i)]["preferred"]
            assert np.array_equal(batch["preferred"][k], base) or np.array_equal(
                batch["preferred"][k], base[:, ::-1])
    with pytest.raises(UserError, match="preferred is bytes, not an array; set image_size"):
        batches(examples, 1, image_size=None, num_threads=0)


def test_caption_dropout_is_seeded(examples):
    a = batches(examples, num_epochs=1, caption_dropout=0.5, shard=shard(0, 1))
    b = batches(examples, num_epochs=1, caption_dropout=0.5, shard=shard(0, 1))
    dropped = np.concatenate([x["caption_dropped"] for x in a])
    assert 0 < dropped.sum() < N
    for x, y in zip(a, b, strict=True):
        assert x["caption"].tolist() == y["caption"].tolist()
        assert all((c == "") == d for c, d in zip(x["caption"], x["caption_dropped"], strict=True))


def test_loader_argument_errors(examples):
    with pytest.raises(UserError, match="multiple of the 2 data process"):
        loader.make_loader(examples, global_batch_size=3, seed=0, shard=shard(0))
    with pytest.raises(UserError, match="flip 'both'"):
        loader.make_loader(examples, global_batch_size=4, seed=0, flip="both")
    with pytest.raises(UserError, match="cannot fill one global batch of 32"):
        loader.make_loader(examples, global_batch_size=32, seed=0)


def test_decode_resizes_shorter_side_and_centre_crops():
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, 4:12] = 255  # white centre band of a 16x8 image
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    image = images.decode_image(out.getvalue(), 4)
    assert image.shape == (4, 4, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[:, 1:3], 1.0)  # the centre 8x8 is the white band
    assert image.min() >= -1.0
