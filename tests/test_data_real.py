"""The readers on the real released tables in ../shared/data (skipped when it is absent)."""

import collections
from pathlib import Path

import pytest

from safealign_jax.data import categories, coprov2, eval_prompts, sage, users, validation
from safealign_jax.data.tables import read_csv

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")

PAIRS_PER_CATEGORY = {
    "Hate": 4393, "Harassment": 1801, "Violence": 2141, "Self-Harm": 958,
    "Sexual": 2712, "Shocking": 2115, "Illegal Activity": 1923,
}


def test_coprov2_train_table():
    path = DATA / "coprov2" / "CoProv2_train.csv"
    _, rows = read_csv(path)
    assert len(rows) == 32086
    report = validation.Report()
    pairs = coprov2.read_prompt_table(path, report)
    assert not report.problems
    assert len(pairs) == 15690
    assert sum(len(p.categories) > 1 for p in pairs) == 321
    index = coprov2.category_index(pairs)
    assert {c: len(v) for c, v in index.items()} == PAIRS_PER_CATEGORY
    spellings = {o for p in pairs for o in p.original_categories}
    assert spellings == {"Hate", "sexual", "Violence", "Shocking", "Illegal Activity", "Harrasment", "self-harm"}
    # every row is reproduced by its pair: one (u, s) row couple per listed category
    assert sum(2 * len(p.categories) for p in pairs) == len(rows)


def test_coprov2_test_table():
    rows = coprov2.read_test_prompts(DATA / "coprov2" / "CoProv2_test.csv")
    assert len(rows) == 8000
    assert {r.categories[0] for r in rows} == set(categories.COPROV2.categories)


@pytest.mark.parametrize("split", ["val", "test_seen", "test_unseen"])
def test_sage_records_obey_the_preference_rule(split):
    profiles = users.read_users(DATA / "sage" / "users" / "users.csv")
    report = validation.Report()
    records = sage.read_split(DATA / "sage" / split / "metadata.jsonl", DATA / "sage" / split, profiles, report)
    assert not report.problems, report.summary()
    assert len(records) == 2100
    assert len({r.user_id for r in records}) == 50
    assert collections.Counter(r.prompt_kind for r in records) == {"harmful": 1050, "safe": 1050}
    assert {r.category for r in records} == set(categories.SAGE.categories)


def test_users_centres_and_embeddings():
    profiles = users.read_users(DATA / "sage" / "users" / "users.csv")
    assert len(profiles) == 1001
    assert profiles[users.PERMISSIVE_USER_ID].banned == ()
    for user_id in users.PUBLISHED_LEVEL_USERS[1:]:
        assert user_id in profiles
    assert len(profiles[users.level_user(5)].banned) == 7
    centres = users.read_center_users(DATA / "sage" / "users" / "center_users.csv")
    assert len(centres) == 5
    for centre in centres:
        assert (centre.banned, centre.allowed) == (profiles[centre.user_id].banned, profiles[centre.user_id].allowed)
    derived = users.level_users(centres)
    assert len(profiles[derived[5]].banned) == 7 and derived[0] == "0001001"
    report = validation.Report()
    vectors = sage.load_embeddings(DATA / "sage" / "embeddings", ["0000001", "0000002"], 3584, report)
    assert not report.problems and vectors["0000001"].shape == (3584,)


@pytest.mark.parametrize(
    "name, rows",
    [("i2p", 4703), ("ud", 1434), ("coprov2", 8000), ("coco", 10000), ("sage_seen", 1050), ("sage_unseen", 1050)],
)
def test_eval_prompt_sets(name, rows):
    prompts = eval_prompts.read_prompt_set(name, DATA / "eval_prompts")
    assert len(prompts) == rows
    assert all(p.prompt.strip() for p in prompts)
    if name == "i2p":
        assert all(p.seed is not None and p.categories for p in prompts)
    if name.startswith("sage"):
        assert len({p.user_id for p in prompts}) == 50
