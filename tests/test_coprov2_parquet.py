"""CoProV2 parquet release with jpg_0 / jpg_1 as file names (the dataset card's string columns,
resolved against the image folder) or as embedded images (bytes / {"bytes", "path"} structs),
told apart per column; a missing image file is reported and its pair left out."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_data_fixtures as F

from safealign_jax import UserError
from safealign_jax.data import coprov2, validation

INDICES = ("0000000", "0000001", "0000004")  # three good pairs of the shared fixtures
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_release(root, jpg_types, drop_file=None):
    """CoProv2_train.csv of INDICES, images/ (all but `drop_file`) and train.parquet: per pair a
    harmful-caption row (label_0 1: jpg_0 = safe image) and a safe-caption row (label_0 0: the
    columns swapped). `jpg_types`: Arrow type of (jpg_0, jpg_1): string, binary or IMAGE_STRUCT."""
    root.mkdir()
    rows = []
    for index in INDICES:
        cats, harmful, safe = F.GOOD_PAIRS[index]
        rows += [[harmful, F.image_name("u", index), c] for c in cats]
        rows += [[safe, F.image_name("s", index), c] for c in cats]
    F.write_csv(root / "CoProv2_train.csv", ["prompt", "image", "category"], rows)
    (root / "images").mkdir()
    for index in INDICES:
        for kind in "us":
            if F.image_name(kind, index) != drop_file:
                (root / "images" / F.image_name(kind, index)).write_bytes(F.pair_image(index, kind))

    def cell(kind, index, arrow_type):
        name = F.image_name(kind, index)
        if arrow_type == pa.string():
            return name
        data = F.pair_image(index, kind)
        return {"bytes": data, "path": name} if arrow_type == IMAGE_STRUCT else data

    table = {"image": [], "jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for index in INDICES:
        _, harmful, safe = F.GOOD_PAIRS[index]
        for caption, label, first, second in ((harmful, 1, "s", "u"), (safe, 0, "u", "s")):
            table["image"].append({"bytes": F.pair_image(index, "u"), "path": None})
            table["jpg_0"].append(cell(first, index, jpg_types[0]))
            table["jpg_1"].append(cell(second, index, jpg_types[1]))
            table["label_0"].append(label)
            table["caption"].append(caption)
    schema = pa.schema([
        ("image", IMAGE_STRUCT), ("jpg_0", jpg_types[0]), ("jpg_1", jpg_types[1]),
        ("label_0", pa.int64()), ("caption", pa.string()),
    ])
    pq.write_table(pa.table(table, schema=schema), root / "train.parquet", row_group_size=4)
    return root


def attach(root, image_dir="images"):
    report = validation.Report()
    pairs = coprov2.read_prompt_table(root / "CoProv2_train.csv", report)
    image_dir = root / image_dir if image_dir else None
    pairs = coprov2.attach_parquet_images(pairs, [root / "train.parquet"], report, image_dir=image_dir)
    return pairs, report


@pytest.mark.parametrize("jpg_types", [
    (pa.string(), pa.string()), (pa.binary(), pa.binary()),
    (IMAGE_STRUCT, IMAGE_STRUCT), (pa.string(), IMAGE_STRUCT),
], ids=["names", "bytes", "image_structs", "names_and_structs"])
def test_parquet_columns_of_names_or_images_give_the_same_pairs(tmp_path, jpg_types):
    pairs, report = attach(write_release(tmp_path / "release", jpg_types))
    assert report.problems == []
    assert [p.pair_id for p in pairs] == list(INDICES)
    assert report.kept == {"pairs_in_table": 3, "pairs": 3}
    for pair, preferred, rejected in coprov2.pair_images(pairs):
        assert preferred == F.pair_image(pair.pair_id, "s")  # the safe image, whatever label_0 says
        assert rejected == F.pair_image(pair.pair_id, "u")
    first = pairs[0]
    if jpg_types[0] == pa.string():  # names: the pair reads the image files; label_0 1 -> jpg_0
        assert first.preferred == tmp_path / "release" / "images" / "s_idx_0000000_0.jpg"
    else:
        assert first.preferred == coprov2.ParquetImage(str(tmp_path / "release" / "train.parquet"), 0, "jpg_0")


def test_four_row_release_with_string_columns_attaches_its_pairs(tmp_path):
    """The issue's case: 4 rows (2 pairs x 2 captions) typed as the dataset card types them."""
    root = write_release(tmp_path / "release", (pa.string(), pa.string()))
    table = pq.read_table(root / "train.parquet").slice(0, 4)
    pq.write_table(table, root / "train.parquet")
    assert pq.read_schema(root / "train.parquet").field("jpg_0").type == pa.string()
    pairs, report = attach(root)
    assert [p.pair_id for p in pairs] == ["0000000", "0000001"]
    assert report.counts() == {"missing_image": 1}  # pair 0000004 has no parquet row
    assert report.kept["pairs"] == 2


def test_missing_image_file_is_reported_and_its_pair_dropped(tmp_path):
    missing = F.image_name("s", "0000001")
    pairs, report = attach(write_release(tmp_path / "release", (pa.string(), pa.string()), missing))
    assert [p.pair_id for p in pairs] == ["0000000", "0000004"]
    assert report.kept == {"pairs_in_table": 3, "pairs": 2}
    # both parquet rows of pair 0000001 (lines 3, 4) name the file; then the pair (its harmful
    # row is line 4 of the CSV: pair 0000000 has lines 2-3) has no images
    assert [(p.kind, p.file.endswith(name), p.line) for p, name in zip(
        report.problems, ["train.parquet", "train.parquet", "CoProv2_train.csv"], strict=True)] == [
        ("missing_image", True, 3), ("missing_image", True, 4), ("missing_image", True, 4)]
    assert missing in report.problems[0].detail and "row left out" in report.problems[0].detail
    with pytest.raises(UserError, match=r"3 unusable row\(s\) or file\(s\) \{'missing_image': 3\}"):
        validation.enforce(report, "fail", "CoProV2 build")


def test_file_names_need_the_image_folder(tmp_path):
    root = write_release(tmp_path / "release", (pa.string(), pa.binary()))
    with pytest.raises(UserError, match=r"jpg_0/jpg_1 hold file names: give the image folder .*--config.images"):
        attach(root, image_dir=None)
    assert [p.pair_id for p in attach(root)[0]] == list(INDICES)  # bytes column: no folder needed


def test_image_column_of_another_type_is_named(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"jpg_0": [1], "jpg_1": [b"x"], "label_0": [1], "caption": ["c"]}), path)
    with pytest.raises(UserError, match=r"bad.parquet: parquet column jpg_0 has type int64; expected file names"):
        coprov2.attach_parquet_images([], [path], validation.Report())


@pytest.mark.parametrize("preset, both", [
    ("sd15", True), ("sd21", True), ("sdxl", True), ("tiny", False), ("psa_sd15", False)])
def test_paper_presets_train_on_every_parquet_row(preset, both):
    """The official script trains on every parquet row: each pair with both captions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "train.py"
    spec = importlib.util.spec_from_file_location("train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config(preset).data.both_captions is both
    rows_per_pair = len(coprov2.caption_choices(15_690, both)) / 15_690
    assert rows_per_pair == (2 if both else 1)  # 31,380 rows of the release for 15,690 pairs
