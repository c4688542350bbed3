"""Your own pairs (safealign_jax/data/pairs.py): CSV / JSONL / parquet tables, images as relative
paths, data: URIs or bytes, free-text categories, every row left out counted by reason, the
TFDS build in the coprov2_pairs schema, and scripts/prepare_data.py --config.kind=pairs run as a
user runs it (printed counts, report file, cache selectable by a free-text category)."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import test_data_fixtures as F

from safealign_jax.data import cache, categories, pairs, validation, views
from safealign_jax.data.tfds_builders import PreferencePairs
from safealign_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
tfds.disable_progress_bar()


def _images(folder: Path, count: int) -> list[bytes]:
    """count distinct 8x8 JPEGs written as folder/img/<i>.jpg; returns their bytes."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    data = [F.image_bytes(100 + i) for i in range(count)]
    for i, d in enumerate(data):
        (folder / "img" / f"{i}.jpg").write_bytes(d)
    return data


def _csv_table(folder: Path) -> Path:
    """A CSV with good rows and one row of each problem; see test_csv_rows_kept_and_left_out."""
    _images(folder, 6)
    (folder / "img" / "broken.jpg").write_bytes(b"not an image")
    F.write_csv(folder / "pairs.csv", ["prompt", "chosen", "rejected", "category", "safe_prompt"], [
        ["a knife", "img/0.jpg", "img/1.jpg", "Weapons", "a spoon"],          # line 2: pair 2
        ["a pill", "img/2.jpg", "img/3.jpg", "drugs, Weapons", ""],            # line 3: pair 3 (2 categories)
        ["a knife", "img/0.jpg", "img/1.jpg", "Kitchen", "a spoon"],          # line 4: adds Kitchen to pair 2
        ["a knife", "img/0.jpg", "img/1.jpg", "Weapons", "a spoon"],          # line 5: duplicate_pair
        ["a gun", "img/4.jpg", "img/missing.jpg", "Weapons", ""],             # line 6: missing_image
        ["a gun", "img/broken.jpg", "img/4.jpg", "Weapons", ""],              # line 7: unreadable_image
        ["  ", "img/4.jpg", "img/5.jpg", "Weapons", ""],                      # line 8: empty_prompt
        ["a gun", "img/4.jpg", "img/4.jpg", "Weapons", ""],                   # line 9: same image (bad_row)
        ["a gun", str(folder / "img" / "4.jpg"), "img/5.jpg", "", ""],        # line 10: absolute path, no category
    ])
    with (folder / "pairs.csv").open("a") as f:
        f.write("a gun,img/4.jpg\n")                                           # line 11: too few fields (bad_row)
    return folder / "pairs.csv"


def test_csv_rows_kept_and_left_out(tmp_path):
    report = validation.Report()
    got = pairs.read_pairs(_csv_table(tmp_path), report)
    assert [(p.pair_id, p.prompt, p.safe_prompt, p.categories) for p in got] == [
        ("2", "a knife", "a spoon", ("Weapons", "Kitchen")),
        ("3", "a pill", "a pill", ("drugs", "Weapons")),
        ("10", "a gun", "a gun", ()),
    ]
    assert report.counts() == {"duplicate_pair": 1, "missing_image": 1, "unreadable_image": 1,
                               "empty_prompt": 1, "bad_row": 2}
    assert [(p.kind, p.line) for p in report.problems] == [
        ("duplicate_pair", 5), ("missing_image", 6), ("unreadable_image", 7), ("empty_prompt", 8),
        ("bad_row", 9), ("bad_row", 11)]
    assert "repeats line 2" in report.problems[0].detail and "missing.jpg" in report.problems[1].detail
    assert report.kept == {"rows": 10 - 6, "pairs": 3}
    assert pairs.category_index(got) == {"Weapons": [0, 1], "Kitchen": [0], "drugs": [1]}
    images = [(p.pair_id, c, r) for p, c, r in pairs.pair_images(tmp_path / "pairs.csv", got)]
    data = [(tmp_path / "img" / f"{i}.jpg").read_bytes() for i in range(6)]
    assert images == [("2", data[0], data[1]), ("3", data[2], data[3]), ("10", data[4], data[5])]


def test_jsonl_data_uris_and_parquet_bytes_build_the_same_data_set(tmp_path):
    data = _images(tmp_path, 4)
    uri = "data:image/jpeg;base64," + base64.b64encode(data[3]).decode()
    rows = [
        {"prompt": "p0", "chosen": "img/0.jpg", "rejected": "img/1.jpg", "category": ["Gore", "Blood"]},
        {"prompt": "p1", "chosen": "img/2.jpg", "rejected": uri, "category": "Gore", "safe_prompt": "s1"},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n[1, 2]\n")  # a blank line, a non-object
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "prompt": ["p0", "p1"], "chosen": pa.array([data[0], data[2]], pa.binary()),
        "rejected": pa.array([{"bytes": data[1], "path": None}, {"bytes": data[3], "path": "x.jpg"}], struct),
        "category": [["Gore", "Blood"], ["Gore"]], "safe_prompt": [None, "s1"],
    }), tmp_path / "pairs.parquet")
    built = {}
    for name in ("pairs.jsonl", "pairs.parquet"):
        table = pairs.load_table(tmp_path / name, "skip")
        builder = PreferencePairs(table=table, data_dir=tmp_path / f"tfds_{name}")
        assert not builder.is_built()
        builder.download_and_prepare()
        assert builder.is_built()
        source, metadata = views.open_built(builder.data_dir, "train")
        built[name] = [(views._text(r["pair_id"]), views._text(r["harmful_prompt"]), views._text(r["safe_prompt"]),
                        [views._text(c) for c in r["categories"]], r["preferred_image"], r["rejected_image"])
                       for r in (source[i] for i in range(len(source)))]
        assert metadata["category_index"] == {"Gore": [0, 1], "Blood": [0]}
        assert metadata["table_sha256"] == pairs.file_sha256(tmp_path / name)
    counts = {n: pairs.load_table(tmp_path / n, "skip").report.counts() for n in built}
    assert counts == {"pairs.jsonl": {"bad_row": 1}, "pairs.parquet": {}}
    jsonl_rows, parquet_rows = built["pairs.jsonl"], built["pairs.parquet"]
    assert [r[0] for r in jsonl_rows] == ["1", "2"] and [r[0] for r in parquet_rows] == ["1", "2"]
    assert jsonl_rows == parquet_rows == [
        ("1", "p0", "p0", ["Gore", "Blood"], data[0], data[1]),
        ("2", "p1", "s1", ["Gore"], data[2], data[3]),
    ]
    # the built set reads as CoProV2 pairs do: the harmful (= table) caption, safe image = chosen
    examples = views.CoProV2Examples(*views.open_built(tmp_path / "tfds_pairs.jsonl/preference_pairs/1.0.0", "train"))
    assert [examples[i]["caption"] for i in range(len(examples))] == ["p0", "p1"]


def test_table_errors_are_one_line(tmp_path):
    (tmp_path / "t.tsv").write_text("x")
    (tmp_path / "cols.csv").write_text("prompt,image\na,b.jpg\n")
    _images(tmp_path, 2)
    (tmp_path / "gone.csv").write_text("prompt,chosen,rejected\na,img/0.jpg,img/9.jpg\nb,img/8.jpg,img/1.jpg\n")
    for name, fragments in (("t.tsv", ["unknown pairs table format '.tsv'"]),
                            ("cols.csv", ["no column(s) chosen, rejected", "columns found: prompt, image"]),
                            ("nope.csv", ["file not found"]),
                            ("gone.csv", ["no usable pair left", "2 row(s) left out {'missing_image': 2}",
                                          "gone.csv:2: missing_image"])):
        with pytest.raises(UserError) as e:
            pairs.load_table(tmp_path / name, "skip")
        assert all(f in str(e.value) for f in fragments) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="1 unusable row"):
        F.write_csv(tmp_path / "one.csv", ["prompt", "chosen", "rejected"],
                    [["a", "img/0.jpg", "img/1.jpg"], ["b", "img/0.jpg", "img/7.jpg"]])
        pairs.load_table(tmp_path / "one.csv", "fail")


def test_category_selection_by_free_text():
    names = ["Weapons", "self harm", "Harassment"]
    assert categories.select("Weapons", names, "w") == "Weapons"
    assert categories.select("weapons", names, "w") == "Weapons"
    assert categories.select("Self-Harm", names, "w") == "self harm"
    assert categories.select("Harrasment", names, "w") == "Harassment"  # CoProV2's misspelling
    with pytest.raises(UserError, match=r"w: unknown category 'Gore'; the data set's categories are 'Weapons'"):
        categories.select("Gore", names, "w")


def _script(*args, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "scripts/prepare_data.py", "--config", "configs/prepare_data.py", *args,
                           "--config.resolution=16", "--config.progress_bar=False"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from pipelines import build_sd

    return build_sd(tmp_path_factory.mktemp("pairs_pipeline"))


def test_prepare_data_script_pairs(pipeline, tmp_path):
    table = _csv_table(tmp_path / "data")
    out = tmp_path / "cache"
    result = _script(f"--workdir={out}", f"--config.pipeline={pipeline}", "--config.kind=pairs",
                     f"--config.table={table}", "--config.shard_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"building the pairs data set from {table} into {out}/dataset/preference_pairs/1.0.0"
    assert lines[1] == (f"data: kept 3 pair(s); left out 6 row(s) (bad_row 2, duplicate_pair 1, empty_prompt 1, "
                        f"missing_image 1, unreadable_image 1); full report: {out}/data_report.json")
    assert json.loads(lines[2])["num_examples"] == 3
    assert "Downloading and preparing" not in result.stdout + result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert [(p["kind"], p["line"]) for p in report["problems"]][:2] == [("duplicate_pair", 5), ("missing_image", 6)]
    # the cache: a free-text category selects its pairs, in any spelling
    assert json.loads((out / cache.METADATA).read_text())["category_index"] == {
        "Weapons": [0, 1], "Kitchen": [0], "drugs": [1]}
    assert [e["id"] for e in cache.CachedExamples(out, category="DRUGS")] == ["3/harmful"]
    assert [e["id"] for e in cache.CachedExamples(out, category="kitchen,Drugs", both_captions=True)] == [
        "2/harmful", "3/harmful", "2/safe", "3/safe"]
    batch = next(cache.CachedPairs(out, seed=0, global_rows=2, rows=slice(0, 2), category="Weapons",
                                   num_threads=0))
    assert batch["latents_w"].shape == (2, 8, 8, 4) and np.isfinite(batch["latents_w"]).all()
    with pytest.raises(UserError, match="unknown category 'Gore'"):
        cache.CachedExamples(out, category="Gore")
    # a rerun reuses the build; a changed table is refused
    again = _script(f"--workdir={out}", f"--config.pipeline={pipeline}", "--config.kind=pairs",
                    f"--config.table={table}", "--config.shard_size=2")
    assert again.returncode == 0 and again.stdout.splitlines()[0].startswith("data: kept 3 pair(s)"), again.stderr
    with table.open("a") as f:
        f.write("one more,img/4.jpg,img/5.jpg,Weapons,\n")
    changed = _script(f"--workdir={out}", f"--config.pipeline={pipeline}", "--config.kind=pairs",
                      f"--config.table={table}", "--config.shard_size=2")
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: {out}/dataset/preference_pairs/1.0.0: holds pairs built from another version of {table}; "
        "delete it or give another --config.tfds_dir."]


def test_prepare_data_script_coprov2_prints_counts(pipeline, tmp_path):
    F.write_coprov2_folder(tmp_path / "coprov2")
    result = _script(f"--workdir={tmp_path / 'cache'}", f"--config.pipeline={pipeline}",
                     f"--config.table={tmp_path / 'coprov2/CoProv2_train.csv'}",
                     f"--config.images={tmp_path / 'coprov2/images'}", f"--config.tfds_dir={tmp_path / 'tfds'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "cache/data_report.json").read_text())
    counts = report["counts"]  # the fixture's broken rows, each left out with its file and line
    assert sum(counts.values()) == len(report["problems"]) >= 5 and report["kept"]["pairs"] == 6
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    assert f"data: kept 6 pair(s); left out {sum(counts.values())} row(s) ({reasons}); full report: " \
           f"{tmp_path / 'cache/data_report.json'}" in result.stdout.splitlines()
    assert "Downloading and preparing" not in result.stdout + result.stderr
