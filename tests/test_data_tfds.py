"""TFDS builders (array_record) on the fixtures: build in a fresh Python without TensorFlow, read
back (with and without the builder class), reports in the metadata, the fail policy, views."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_data_fixtures as F

from safealign_jax import UserError
from safealign_jax.data import tfds_builders, views

tfds.disable_progress_bar()

BUILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    import tensorflow_datasets as tfds
    from safealign_jax.data import tfds_builders, views
    tfds.disable_progress_bar()
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    c = tfds_builders.CoProV2Pairs(table=root / "coprov2" / "CoProv2_train.csv",
        images=root / "coprov2" / "images", policy="skip", data_dir=out)
    c.download_and_prepare()
    s = tfds_builders.SagePreferences(root=root / "sage", embedding_dim=16, policy="skip",
        data_dir=out)
    s.download_and_prepare()
    first = views.coprov2_examples(c)[0]
    print(json.dumps({
        "coprov2_dir": str(c.data_dir), "sage_dir": str(s.data_dir),
        "first_id": first["id"],
        "tensorflow_loaded": "tensorflow" in sys.modules,
        "tensorflow_installed": importlib.util.find_spec("tensorflow") is not None,
    }))
    """
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    F.write_coprov2_folder(root / "coprov2")
    F.write_coprov2_parquet(root / "coprov2_parquet")
    F.write_sage(root / "sage")
    out = tmp_path_factory.mktemp("tfds")
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(root), str(out)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return root, info


def test_build_and_read_without_tensorflow(built):
    _, info = built
    assert not info["tensorflow_loaded"]
    assert not info["tensorflow_installed"]
    assert info["first_id"] == "0000000/harmful"


def test_coprov2_round_trip_from_directory(built):
    _, info = built
    source, metadata = views.open_built(info["coprov2_dir"], "train")
    assert len(source) == 6
    records = [source[i] for i in range(len(source))]
    assert [r["pair_id"].decode() for r in records] == list(F.GOOD_PAIRS)
    for r in records:
        index = r["pair_id"].decode()
        assert r["preferred_image"] == F.pair_image(index, "s")
        assert r["rejected_image"] == F.pair_image(index, "u")
        assert r["harmful_prompt"].decode() == F.GOOD_PAIRS[index][1]
        assert tuple(c.decode() for c in r["categories"]) == F.EXPECTED_CATEGORIES[index]
    assert [c.decode() for c in records[1]["original_categories"]] == ["Harrasment", "sexual"]
    assert metadata["category_index"]["Hate"] == [0, 4]
    assert metadata["category_index"]["Violence"] == []
    assert metadata["validation"]["counts"] == {
        "empty_prompt": 1, "duplicate_pair": 2, "unknown_category": 4,
        "missing_image": 1, "unreadable_image": 1,
    }
    assert metadata["validation"]["kept"]["pairs"] == 6


def test_coprov2_views(built):
    _, info = built
    hate = views.coprov2_examples(info["coprov2_dir"], category="hate", both_captions=True)
    assert [e["id"] for e in hate] == [
        "0000000/harmful", "0000008/harmful", "0000000/safe", "0000008/safe"]
    safe = hate[3]
    assert safe["caption"] == F.GOOD_PAIRS["0000008"][2]
    assert safe["preferred"] == F.pair_image("0000008", "s")
    assert safe["rejected"] == F.pair_image("0000008", "u")
    assert len(views.coprov2_examples(info["coprov2_dir"])) == 6
    with pytest.raises(UserError, match="unknown CoProV2 category 'Propaganda'"):
        views.coprov2_examples(info["coprov2_dir"], category="Propaganda")
    with pytest.raises(UserError, match="no split 'test'"):
        views.open_built(info["coprov2_dir"], "test")


def test_sage_round_trip(built):
    _, info = built
    source, metadata = views.open_built(info["sage_dir"], "train")
    assert len(source) == 8 and len(views.open_built(info["sage_dir"], "val")[0]) == 4
    assert metadata["embedding_dim"] == 16
    assert metadata["validation"]["counts"]["user_without_embedding"] == 4
    assert metadata["validation"]["kept"] == {"train": 8, "val": 4}
    examples = views.sage_examples(info["sage_dir"], "train")
    first = examples[0]
    assert first["user_id"] == "0000001"
    assert first["id"] == "user_0000001_violence_street_fight_00001.jpg_u.jpg"
    np.testing.assert_array_equal(first["user_embedding"], np.full((16,), 1.0, np.float32))
    record = source[0]
    folder = Path(info["sage_dir"])
    assert record["prompt_kind"] == b"harmful" and record["category"] == b"Violence"
    assert first["preferred"][:2] == b"\xff\xd8" and folder.is_dir()


def test_parquet_build_matches_folder_build(built, tmp_path):
    root, info = built
    builder = tfds_builders.CoProV2Pairs(
        table=root / "coprov2_parquet" / "CoProv2_train.csv",
        parquet=[root / "coprov2_parquet" / "train.parquet"],
        policy="skip", data_dir=tmp_path,
    )
    builder.download_and_prepare()
    assert builder.report.counts()["caption_not_found"] == 1
    from_parquet = {e["id"]: e for e in views.coprov2_examples(builder)}
    from_folder = {e["id"]: e for e in views.coprov2_examples(info["coprov2_dir"])}
    assert from_parquet == from_folder


def test_manual_dir_and_fail_policy(built, tmp_path):
    root, _ = built
    config = tfds.download.DownloadConfig(manual_dir=str(root / "coprov2"))
    builder = tfds_builders.CoProV2Pairs(data_dir=tmp_path, policy="fail")
    with pytest.raises(UserError, match=r"(?s)CoProV2 build from .*9 unusable row\(s\).*empty_prompt"):
        builder.download_and_prepare(download_config=config)
    assert not (tmp_path / "coprov2_pairs" / "1.0.0" / "dataset_info.json").exists()
    with pytest.raises(UserError, match="only 'array_record'"):
        tfds_builders.CoProV2Pairs(data_dir=tmp_path, file_format="tfrecord")
    with pytest.raises(UserError, match="policy 'lenient'"):
        tfds_builders.SagePreferences(data_dir=tmp_path, policy="lenient")


def test_loader_over_built_sage_split(built):
    import grain

    from safealign_jax.data import loader

    _, info = built
    ds = loader.make_loader(
        views.sage_examples(info["sage_dir"], "train"), global_batch_size=4, seed=0,
        image_size=F.SIZE, shard=grain.sharding.ShardOptions(shard_index=1, shard_count=2),
        num_epochs=1, num_threads=0,
    )
    got = list(ds)
    assert len(got) == 2
    batch = got[0]
    assert batch["user_embedding"].shape == (2, 16) and batch["user_embedding"].dtype == np.float32
    assert batch["preferred"].shape == (2, F.SIZE, F.SIZE, 3)
    assert set(batch["user_id"]) <= {"0000001", "0000002"}
