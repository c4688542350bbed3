"""Sage (PSA) preference records from the released metadata.jsonl files.

Each line: {"file_name": "user_0000030_propaganda_ideological_pamphlet_00001.jpg_u.jpg",
"chosen": "..._00001_s.jpg", "rejected": "..._00001_u.jpg", "caption": ..., "user_data":
{"User_ID": "0000030", ...}}. The suffix after '.jpg' in file_name says which prompt the caption
is: `_u` the harmful prompt, `_s` its safe rewrite; the image files `..._s.jpg` / `..._u.jpg` were
rendered from those prompts and sit in the split folder (the official image root). Category
names in file names are lower case ('self-harm'); concepts may contain '_' and '-'.

Released preference rule (checked for every record): for a harmful-prompt record chosen = _s if
the user bans the category, else _u; for a safe-prompt record chosen = _s.

User embeddings: one `{user_id}.npy` per user in a folder, float32 of shape (E,) (E = 3584 for
Qwen2.5-7B); (1, E) is accepted and squeezed like the official loader does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from safealign_jax.data import categories, validation
from safealign_jax.data.jsonl import jsonl_lines
from safealign_jax.data.users import UserProfile
from safealign_jax.errors import UserError

SPLITS = ("train", "val", "test_seen", "test_unseen")
IMAGE_NAME = re.compile(
    r"user_(?P<user>\d{7})_(?P<category>[^_]+)_(?P<concept>.+)_(?P<index>\d+)"
    r"(?:\.(?:jpg|png))?_(?P<kind>[su])\.(?:jpg|png)"
)


@dataclasses.dataclass(frozen=True)
class ImageName:
    """The parts of a Sage image or record name."""

    user_id: str
    category: str  # canonical Sage name
    category_original: str
    concept: str
    index: str
    kind: str  # 's' (safe prompt) or 'u' (harmful prompt)


@dataclasses.dataclass(frozen=True)
class SageRecord:
    """One Sage training/eval record. `chosen`/`rejected` are image paths."""

    record_id: str
    user_id: str
    category: str
    category_original: str
    concept: str
    prompt_kind: str  # 'harmful' or 'safe'
    caption: str
    chosen: Path
    rejected: Path
    source: str
    line: int


def parse_image_name(name: str) -> ImageName | None:
    """Parts of `user_{uid}_{category}_{concept}_{idx}[.jpg]_{s|u}.jpg`, or None if the name
    does not have that form or names no Sage category."""
    match = IMAGE_NAME.fullmatch(name.strip())
    if match is None:
        return None
    category = categories.SAGE.canonical(match["category"])
    if category is None:
        return None
    return ImageName(
        match["user"], category, match["category"], match["concept"], match["index"], match["kind"]
    )


def expected_chosen_kind(prompt_kind: str, category: str, user: UserProfile) -> str:
    """'s' or 'u': which image the released rule prefers for this record."""
    return "s" if prompt_kind == "safe" or user.bans(category) else "u"


def _stem(name: ImageName) -> str:
    return f"user_{name.user_id}_{name.category_original}_{name.concept}_{name.index}"


def read_split(
    metadata_path,
    image_dir,
    users: Mapping[str, UserProfile],
    report: validation.Report,
) -> list[SageRecord]:
    """Records of one split's metadata.jsonl (file order); bad lines -> `report`.

    Checks: JSON and fields, name form and category, user known and consistent, non-empty
    caption, no duplicate record, the preference rule. Images are checked by `check_images`.
    """
    path = Path(metadata_path)
    if not path.is_file():
        raise UserError(f"Sage metadata file {path} does not exist.")
    image_dir = Path(image_dir)
    records, seen = [], {}
    for line, text in jsonl_lines(path):
        try:
            item = json.loads(text)
            file_name, chosen, rejected = item["file_name"], item["chosen"], item["rejected"]
            caption = item.get("caption") or ""
            listed_user = str(item.get("user_data", {}).get("User_ID", "")).zfill(7)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            report.add("bad_row", path, line, f"not a Sage record ({type(error).__name__}: {error})")
            continue
        name = parse_image_name(str(file_name))
        if name is None:
            match = IMAGE_NAME.fullmatch(str(file_name).strip())
            if match is None:
                report.add("bad_row", path, line, f"file_name {file_name!r} is not user_NNNNNNN_category_concept_N.jpg_[su].jpg")
            else:
                report.add(
                    "unknown_category", path, line,
                    f"category {match['category']!r} is not one of {', '.join(categories.SAGE.categories)}",
                )
            continue
        if listed_user != name.user_id:
            report.add("unknown_user", path, line, f"user_data.User_ID {listed_user} but file_name says {name.user_id}")
            continue
        user = users.get(name.user_id)
        if user is None:
            report.add("unknown_user", path, line, f"user {name.user_id} is not in users.csv")
            continue
        if not caption.strip():
            report.add("empty_prompt", path, line, f"record {file_name} has an empty caption")
            continue
        if file_name in seen:
            report.add("duplicate_pair", path, line, f"repeats record {file_name} of line {seen[file_name]}")
            continue
        seen[file_name] = line
        stem = _stem(name)
        if {chosen, rejected} != {f"{stem}_s.jpg", f"{stem}_u.jpg"}:
            report.add("bad_row", path, line, f"chosen/rejected {chosen!r}/{rejected!r} are not {stem}_s.jpg/_u.jpg")
            continue
        prompt_kind = "harmful" if name.kind == "u" else "safe"
        want = expected_chosen_kind(prompt_kind, name.category, user)
        if chosen != f"{stem}_{want}.jpg":
            banned = "bans" if user.bans(name.category) else "allows"
            report.add(
                "rule_violation", path, line,
                f"{prompt_kind}-prompt record, user {name.user_id} {banned} {name.category}: "
                f"chosen should be _{want}, is {chosen}",
            )
            continue
        records.append(
            SageRecord(
                record_id=file_name,
                user_id=name.user_id,
                category=name.category,
                category_original=name.category_original,
                concept=name.concept,
                prompt_kind=prompt_kind,
                caption=caption,
                chosen=image_dir / chosen,
                rejected=image_dir / rejected,
                source=str(path),
                line=line,
            )
        )
    return records


def load_embeddings(
    folder, user_ids: Iterable[str], dim: int, report: validation.Report
) -> dict[str, np.ndarray]:
    """{user id: float32 (dim,)} for the users whose `{id}.npy` exists, loads, has `dim` finite
    values; the others -> `report` (file = the .npy path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"user embedding folder {folder} does not exist.")
    out = {}
    for user_id in sorted(set(user_ids)):
        file = folder / f"{user_id}.npy"
        if not file.is_file():
            report.add("missing_embedding", file, None, f"user {user_id} has no embedding file")
            continue
        try:
            value = np.load(file, allow_pickle=False)
        except (ValueError, OSError) as error:
            report.add("bad_embedding", file, None, f"cannot be read as .npy ({error})")
            continue
        value = np.squeeze(value)
        if value.shape != (dim,) or not np.issubdtype(value.dtype, np.floating):
            report.add(
                "bad_embedding", file, None,
                f"shape {value.shape} dtype {value.dtype}, expected floats of shape ({dim},)",
            )
            continue
        if not np.all(np.isfinite(value)):
            report.add("bad_embedding", file, None, "contains NaN or infinite values")
            continue
        out[user_id] = value.astype(np.float32)
    return out


def keep_with_embeddings(
    records: Sequence[SageRecord], embeddings: Mapping[str, np.ndarray], report: validation.Report
) -> list[SageRecord]:
    """Records whose user has an embedding; the others -> `report` at their own line."""
    out = []
    for record in records:
        if record.user_id in embeddings:
            out.append(record)
        else:
            report.add(
                "user_without_embedding", record.source, record.line,
                f"user {record.user_id} has no usable embedding; record left out",
            )
    return out


def check_images(records: Sequence[SageRecord], report: validation.Report) -> list[SageRecord]:
    """Records whose chosen and rejected images exist and decode; the others -> `report`."""
    out, verdict = [], {}
    for record in records:
        problems = []
        for path in (record.chosen, record.rejected):
            if path not in verdict:
                verdict[path] = validation.image_file_problem(path)
            if verdict[path] is not None:
                problems.append(verdict[path])
        for kind, detail in problems:
            report.add(kind, record.source, record.line, f"{detail}; record left out")
        if not problems:
            out.append(record)
    return out
