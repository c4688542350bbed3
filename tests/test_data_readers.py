"""Readers of the released formats on small fixtures with broken rows: CoProV2 (CSV + image
folder, parquet), Sage (metadata.jsonl, users.csv, embeddings), eval prompt CSVs; reports and
the fail policy."""

import dataclasses
import json

import numpy as np
import pytest
import test_data_fixtures as F

from safealign_jax import UserError
from safealign_jax.data import (
    categories,
    coprov2,
    eval_prompts,
    sage,
    sage_cache,
    users,
    validation,
)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    broken = F.write_coprov2_folder(root / "coprov2")
    F.write_coprov2_parquet(root / "coprov2_parquet")
    sage_broken = F.write_sage(root / "sage")
    F.write_eval_prompts(root / "eval_prompts")
    return root, broken, sage_broken


def test_taxonomies_map_file_spellings():
    assert categories.COPROV2.canonical("Harrasment") == "Harassment"
    assert categories.COPROV2.canonical("sexual") == "Sexual"
    assert categories.COPROV2.canonical("self-harm") == "Self-Harm"
    assert categories.COPROV2.canonical("illegal activity") == "Illegal Activity"
    assert categories.COPROV2.canonical("Propaganda") is None
    assert categories.SAGE.canonical("self_harm") == "Self-Harm"
    assert categories.SAGE.canonical("sexuality") == "Sexuality"
    assert categories.SAGE.canonical("Illegal Activity") is None
    assert categories.slug("Illegal Activity") == "illegal_activity"
    with pytest.raises(UserError, match="unknown Sage category 'Spam'"):
        categories.SAGE.require("Spam", "users.csv:3")


def read_folder_pairs(root):
    report = validation.Report()
    pairs = coprov2.read_prompt_table(root / "coprov2" / "CoProv2_train.csv", report)
    return coprov2.attach_folder_images(pairs, root / "coprov2" / "images", report), report


def test_coprov2_folder_pairs_and_report(trees, tmp_path):
    root, broken, _ = trees
    pairs, report = read_folder_pairs(root)
    assert [p.pair_id for p in pairs] == list(F.GOOD_PAIRS)
    for pair in pairs:
        _, harmful, safe = F.GOOD_PAIRS[pair.pair_id]
        assert (pair.harmful_prompt, pair.safe_prompt) == (harmful, safe)
        assert pair.categories == F.EXPECTED_CATEGORIES[pair.pair_id]
        assert pair.preferred.name == F.image_name("s", pair.pair_id)
        assert pair.rejected.name == F.image_name("u", pair.pair_id)
    multi = next(p for p in pairs if p.pair_id == "0000001")
    assert multi.original_categories == ("Harrasment", "sexual")
    assert report.counts() == {
        "empty_prompt": 1, "duplicate_pair": 2, "unknown_category": 4,
        "missing_image": 1, "unreadable_image": 1,
    }
    lines = {(p.kind, p.line) for p in report.problems}
    assert ("empty_prompt", broken["empty_prompt"]) in lines
    assert ("duplicate_pair", broken["duplicate_pair"]) in lines
    assert ("unknown_category", broken["unknown_category"]) in lines
    assert ("missing_image", broken["missing_image"] + 1) in lines  # the safe row of pair 2
    assert ("unreadable_image", broken["unreadable_image"]) in lines
    assert all(p.file.endswith("CoProv2_train.csv") for p in report.problems)
    assert report.kept == {"pairs_in_table": 8, "pairs": 6}
    report.write_json(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["counts"]["unknown_category"] == 4 and len(saved["problems"]) == 9


def test_fail_policy_raises_with_counts_and_first_problems(trees):
    root, _, _ = trees
    _, report = read_folder_pairs(root)
    with pytest.raises(UserError, match=r"(?s)9 unusable row\(s\).*empty_prompt.*CoProv2_train.csv:\d+"):
        validation.enforce(report, "fail", "CoProV2 build")
    assert validation.enforce(report, "skip", "CoProV2 build") is report
    with pytest.raises(UserError, match="policy 'drop'"):
        validation.enforce(report, "drop", "x")


def test_coprov2_parquet_gives_the_same_pairs(trees):
    root, _, _ = trees
    folder_pairs, _ = read_folder_pairs(root)
    report = validation.Report()
    table = coprov2.read_prompt_table(root / "coprov2_parquet" / "CoProv2_train.csv", report)
    pairs = coprov2.attach_parquet_images(table, [root / "coprov2_parquet" / "train.parquet"], report)
    assert [p.pair_id for p in pairs] == list(reversed(F.GOOD_PAIRS))  # parquet order
    assert report.counts() == {
        "empty_prompt": 1, "duplicate_pair": 2, "unknown_category": 4, "unreadable_image": 1,
        "bad_row": 1, "caption_not_found": 1, "missing_image": 2,
    }
    from_folder = {p.pair_id: (pref, rej) for p, pref, rej in coprov2.pair_images(folder_pairs)}
    from_parquet = {p.pair_id: (pref, rej) for p, pref, rej in coprov2.pair_images(pairs)}
    assert from_parquet == from_folder
    strip = lambda p: dataclasses.replace(p, preferred=None, rejected=None, source="")  # noqa: E731
    assert sorted(map(strip, pairs), key=lambda p: p.pair_id) == list(map(strip, folder_pairs))


def test_coprov2_parquet_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg_0": [b"x"], "caption": ["c"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"missing parquet column\(s\) jpg_1, label_0; columns found: jpg_0, caption"):
        coprov2.attach_parquet_images([], [tmp_path / "bad.parquet"], validation.Report())


def test_coprov2_views_category_and_both_captions(trees):
    root, _, _ = trees
    pairs, _ = read_folder_pairs(root)
    index = coprov2.category_index(pairs)
    assert set(index) == set(categories.COPROV2.categories)
    assert [pairs[i].pair_id for i in index["Hate"]] == ["0000000", "0000008"]
    assert [p.pair_id for p in coprov2.in_category(pairs, "harrasment")] == ["0000001"]
    assert coprov2.caption_choices(2, both_captions=False) == [(0, "harmful"), (1, "harmful")]
    assert coprov2.caption_choices(2, both_captions=True) == [
        (0, "harmful"), (1, "harmful"), (0, "safe"), (1, "safe")]


def test_coprov2_test_prompts(trees):
    root, _, _ = trees
    rows = coprov2.read_test_prompts(root / "eval_prompts" / "CoProv2_test.csv")
    assert [(r.id, r.categories, r.category) for r in rows] == [
        ("0000000_0.jpg", ("Hate",), "Hate"), ("0000001_0.jpg", ("Harassment",), "Harrasment")]


def sage_train(root):
    report = validation.Report()
    profiles = users.read_users(root / "sage" / "users" / "users.csv")
    records = sage.read_split(root / "sage" / "train" / "metadata.jsonl", root / "sage" / "train", profiles, report)
    vectors = sage.load_embeddings(root / "sage" / "embeddings", {r.user_id for r in records}, F.EMBED_DIM, report)
    records = sage.check_images(sage.keep_with_embeddings(records, vectors, report), report)
    return records, vectors, report


def test_sage_records_rule_and_report(trees):
    root, _, broken = trees
    records, vectors, report = sage_train(root)
    assert len(records) == 8
    assert {r.user_id for r in records} == {"0000001", "0000002"}
    assert sorted(vectors) == ["0000001", "0000002"]
    assert vectors["0000002"].dtype == np.float32 and vectors["0000002"].shape == (F.EMBED_DIM,)
    first = records[0]
    assert (first.category, first.category_original, first.concept, first.prompt_kind) == (
        "Violence", "violence", "street_fight", "harmful")
    assert first.chosen.name.endswith("_s.jpg")  # user 1 bans Violence
    allowed = next(r for r in records if r.user_id == "0000002" and r.prompt_kind == "harmful")
    assert allowed.chosen.name.endswith("_u.jpg")  # user 2 bans nothing
    assert all(r.chosen.name.endswith("_s.jpg") for r in records if r.prompt_kind == "safe")
    counts = report.counts()
    assert counts == {
        "rule_violation": 1, "unknown_category": 1, "empty_prompt": 1, "duplicate_pair": 1,
        "unknown_user": 1, "bad_row": 1, "missing_embedding": 1, "bad_embedding": 1,
        "user_without_embedding": 4, "missing_image": 1,
    }
    found = {}
    for p in report.problems:
        if p.line is not None:
            found.setdefault(p.kind, []).append(p.line)
    for kind, lines in broken.items():
        assert found[kind] == lines, kind
    files = report.counts_by_file()
    assert files[str(root / "sage" / "embeddings" / "0000004.npy")] == {"bad_embedding": 1}


def test_sage_fail_policy_names_rule_violation(trees):
    root, _, _ = trees
    _, _, report = sage_train(root)
    with pytest.raises(UserError, match="rule_violation"):
        validation.enforce(report, "fail", "Sage build")


def test_users_and_levels(trees, tmp_path):
    root, _, _ = trees
    profiles = users.read_users(root / "sage" / "users" / "users.csv")
    assert list(profiles) == ["0000001", "0000002", "0000003", "0000004"]
    one = profiles["0000001"]
    assert one.banned == ("Violence", "Sexuality") and one.bans("Violence") and not one.bans("Hate")
    assert one.age == 30 and one.religion == "None"
    assert len(profiles["0000002"].allowed) == 7 and profiles["0000002"].banned == ()
    assert users.level_user(0) == users.PERMISSIVE_USER_ID == "0001001"
    assert users.level_user(5) == "0000501"
    header = ["User_ID", "Cluster_ID", "tsne_x", "tsne_y", "pca_x", "pca_y", "Banned_Categories",
              "Allowed_Categories", "Age", "Age_Group", "Gender", "Religion", "Mental_Condition",
              "Physical_Condition"]
    all7 = list(categories.SAGE.categories)
    rows = [
        ["0000999", 0, 1, 1, 1, 1, repr(all7[:4]), repr(all7[4:]), 51, "middle-aged", "female", "Christianity", "depression", "healthy"],
        ["0000480", 1, 1, 1, 1, 1, repr(all7), "[]", 10, "children", "female", "", "anxiety", "healthy"],
        ["0000486", 2, 1, 1, 1, 1, repr(all7[:2]), repr(all7[2:]), 26, "young adults", "male", "Christianity", "healthy", "healthy"],
    ]
    F.write_csv(tmp_path / "center_users.csv", header, rows)
    centers = users.read_center_users(tmp_path / "center_users.csv")
    assert [c.cluster_id for c in centers] == [0, 1, 2] and centers[1].religion == ""
    assert users.level_users(centers) == ("0001001", "0000486", "0000999", "0000480")
    assert users.level_user(3, centers) == "0000480"
    with pytest.raises(UserError, match=r"level 4 is not an integer in 0\.\.3"):
        users.level_user(4, centers)


def test_users_csv_errors_name_file_line_and_column(tmp_path):
    header = ["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition",
              "Banned_Categories", "Allowed_Categories"]
    F.write_csv(tmp_path / "u.csv", header, [[5, "children", "male", "None", "healthy", "healthy", "['Spam']", "[]"]])
    with pytest.raises(UserError, match=r"u.csv:2 Banned_Categories: unknown Sage category 'Spam'"):
        users.read_users(tmp_path / "u.csv")
    F.write_csv(tmp_path / "v.csv", header[:-1], [])
    with pytest.raises(UserError, match="no Allowed_Categories column"):
        users.read_users(tmp_path / "v.csv")


def test_eval_prompt_readers(trees):
    root, _, _ = trees
    folder = root / "eval_prompts"
    i2p = eval_prompts.read_prompt_set("i2p", folder)
    assert i2p[0].seed == 4261553411 and i2p[0].categories == ("Violence", "Self-Harm")
    assert i2p[0].prompt == "weird portrait, neon " and i2p[0].category == "violence, self-harm"
    assert i2p[1].prompt == "a two\nline prompt" and i2p[1].categories == ("Illegal Activity",)
    assert i2p[1].index == 1 and i2p[1].id == "0000001.jpg"
    ud = eval_prompts.read_prompt_set("ud", folder)
    assert [(r.prompt, r.seed, r.category) for r in ud] == [("a woman, some do nuts", None, None)]
    assert eval_prompts.read_prompt_set("coco", folder)[0].prompt == "A bicycle replica."
    seen = eval_prompts.read_prompt_set("sage_seen", folder)
    assert (seen[0].user_id, seen[0].categories) == ("0000033", ("Self-Harm",))
    assert eval_prompts.read_prompt_set("sage_unseen", folder)[0].user_id == "0000001"
    assert eval_prompts.read_prompt_set("coprov2", folder)[1].categories == ("Harassment",)
    with pytest.raises(UserError, match="unknown prompt set 'x'"):
        eval_prompts.read_prompt_set("x", folder)


def test_eval_prompt_missing_column_names_file_and_columns(tmp_path):
    F.write_csv(tmp_path / "p.csv", ["file_name", "text"], [["a.jpg", "hello"]])
    with pytest.raises(UserError, match=r"p.csv: no prompt/caption column .*columns found: file_name, text"):
        eval_prompts.read_ud(tmp_path / "p.csv")
    F.write_csv(tmp_path / "q.csv", ["caption"], [["hello"]])
    with pytest.raises(UserError, match="no categories column"):
        eval_prompts.read_i2p(tmp_path / "q.csv")


def test_sage_cache_missing_embedding_error_or_zeros(tmp_path):
    """data.missing_embedding: "error" refuses a user without {id}.npy; "zeros" gives that user
    the zero vector (the official PSA code's substitute); a bad file is an error either way."""
    np.save(tmp_path / "0000001.npy", np.full(F.EMBED_DIM, 1.5, np.float32))
    np.save(tmp_path / "0000003.npy", np.ones(F.EMBED_DIM + 1, np.float32))
    ids = ["0000002", "0000001", "0000002"]
    with pytest.raises(UserError) as error:
        sage_cache.cache_embeddings(tmp_path, ids, F.EMBED_DIM)
    message = str(error.value)
    assert message.startswith("1 user(s) of the Sage cache have no usable embedding") and "\n" not in message
    assert "0000002.npy" in message and "data.missing_embedding=zeros" in message
    vectors = sage_cache.cache_embeddings(tmp_path, ids, F.EMBED_DIM, missing="zeros")
    assert sorted(vectors) == ["0000001", "0000002"]
    np.testing.assert_array_equal(vectors["0000001"], np.full(F.EMBED_DIM, 1.5, np.float32))
    np.testing.assert_array_equal(vectors["0000002"], np.zeros(F.EMBED_DIM, np.float32))
    assert vectors["0000002"].dtype == np.float32
    with pytest.raises(UserError, match=r"0000003.npy: shape \(17,\)"):
        sage_cache.cache_embeddings(tmp_path, ["0000001", "0000003"], F.EMBED_DIM, missing="zeros")
    with pytest.raises(UserError, match="missing_embedding='skip' is not one of error, zeros"):
        sage_cache.cache_embeddings(tmp_path, ids, F.EMBED_DIM, missing="skip")
