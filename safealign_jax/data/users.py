"""PSA user profiles (Sage `users/users.csv`, `users/center_users.csv`) and safety levels.

users.csv columns: Age, Age_Group, Gender, Religion, Physical_Condition, Mental_Condition,
Banned_Categories, Allowed_Categories; no id column: the user id is the 1-based row number
written with 7 digits ('0000001'). The category lists are Python list literals
("['Propaganda', 'Sexuality']", "[]"), together always the 7 Sage categories. center_users.csv
has the same fields plus User_ID, Cluster_ID and plot coordinates (Religion may be empty there
where users.csv writes 'None').

Levels: 0 is the permissive user 0001001 (bans nothing); 1..5 are five cluster-centre users
from least to most restrictive. `level_user(level)` returns the users the official PSA
evaluation script hard-codes (`PUBLISHED_LEVEL_USERS`, the ones behind the paper's numbers);
`level_user(level, center_users)` derives the order from a center_users.csv instead (by number
of banned categories, ties in file order), which cannot reproduce the official table: its L2
(0000697) and L3 (0000002) both ban four categories. Sampling and evaluation resolve levels with
`safealign_jax.psa_users.level_user_ids`: the official table by default, a center_users.csv only
when one is named.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from safealign_jax.data import categories
from safealign_jax.data.tables import column, is_malformed, read_csv
from safealign_jax.errors import UserError

PERMISSIVE_USER_ID = "0001001"
PUBLISHED_LEVEL_USERS = ("0001001", "0000797", "0000697", "0000002", "0000742", "0000501")
PROFILE_COLUMNS = (
    "Age",
    "Age_Group",
    "Gender",
    "Religion",
    "Physical_Condition",
    "Mental_Condition",
    "Banned_Categories",
    "Allowed_Categories",
)


@dataclasses.dataclass(frozen=True)
class UserProfile:
    """One user: profile fields as written, banned/allowed as canonical Sage categories."""

    user_id: str
    age: int
    age_group: str
    gender: str
    religion: str
    physical_condition: str
    mental_condition: str
    banned: tuple[str, ...]
    allowed: tuple[str, ...]
    cluster_id: int | None = None

    def bans(self, category: str) -> bool:
        return category in self.banned


def format_user_id(value, where: str) -> str:
    """'33', 33 or '0000033' -> '0000033'."""
    text = str(value).strip()
    if not text.isdigit() or len(text) > 7:
        raise UserError(f"{where}: user id {value!r} is not a number of at most 7 digits.")
    return text.zfill(7)


def _category_list(text: str, where: str) -> tuple[str, ...]:
    try:
        names = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError) as error:
        raise UserError(f"{where}: {text!r} is not a list like \"['Hate', 'Violence']\".") from error
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}: {text!r} is not a list of category names.")
    return categories.SAGE.sort(categories.SAGE.require(n, where) for n in names)


def _profile(path: Path, line: int, row: dict, user_id: str, cluster_id: int | None) -> UserProfile:
    where = f"{path}:{line}"
    if is_malformed(row):
        raise UserError(f"{where}: row does not have the {len(row)} fields of the header.")
    try:
        age = int(row["Age"])
    except ValueError as error:
        raise UserError(f"{where}: Age {row['Age']!r} is not an integer.") from error
    banned = _category_list(row["Banned_Categories"], f"{where} Banned_Categories")
    allowed = _category_list(row["Allowed_Categories"], f"{where} Allowed_Categories")
    if set(banned) & set(allowed):
        raise UserError(f"{where}: categories {set(banned) & set(allowed)} both banned and allowed.")
    return UserProfile(
        user_id=user_id,
        age=age,
        age_group=row["Age_Group"],
        gender=row["Gender"],
        religion=row["Religion"],
        physical_condition=row["Physical_Condition"],
        mental_condition=row["Mental_Condition"],
        banned=banned,
        allowed=allowed,
        cluster_id=cluster_id,
    )


def _check_columns(path: Path, columns: list[str], required: Sequence[str]) -> None:
    for name in required:
        column(path, columns, (name,), name)


def read_users(path) -> dict[str, UserProfile]:
    """{7-digit user id: profile} from users.csv (id = 1-based row number, or a User_ID column)."""
    path = Path(path)
    columns, rows = read_csv(path)
    _check_columns(path, columns, PROFILE_COLUMNS)
    users = {}
    for number, (line, row) in enumerate(rows, start=1):
        user_id = (
            format_user_id(row["User_ID"], f"{path}:{line}") if "User_ID" in columns
            else f"{number:07d}"
        )
        if user_id in users:
            raise UserError(f"{path}:{line}: user id {user_id} appears twice.")
        users[user_id] = _profile(path, line, row, user_id, None)
    return users


def read_center_users(path) -> list[UserProfile]:
    """The cluster-centre users of center_users.csv, in file order."""
    path = Path(path)
    columns, rows = read_csv(path)
    _check_columns(path, columns, ("User_ID", "Cluster_ID", *PROFILE_COLUMNS))
    out = []
    for line, row in rows:
        user_id = format_user_id(row["User_ID"], f"{path}:{line}")
        try:
            cluster = int(row["Cluster_ID"])
        except (TypeError, ValueError) as error:
            raise UserError(f"{path}:{line}: Cluster_ID {row['Cluster_ID']!r} is not an integer.") from error
        out.append(_profile(path, line, row, user_id, cluster))
    return out


def level_users(center_users: Sequence[UserProfile] | None = None) -> tuple[str, ...]:
    """User ids of levels 0..N: the published ones, or derived from `center_users`."""
    if center_users is None:
        return PUBLISHED_LEVEL_USERS
    ordered = sorted(center_users, key=lambda u: len(u.banned))
    return (PERMISSIVE_USER_ID, *(u.user_id for u in ordered))


def level_user(level: int, center_users: Sequence[UserProfile] | None = None) -> str:
    """The user id of safety level `level` (0 = permissive ... 5 = bans all 7 categories)."""
    ids = level_users(center_users)
    if not isinstance(level, int) or not 0 <= level < len(ids):
        raise UserError(f"PSA level {level!r} is not an integer in 0..{len(ids) - 1}.")
    return ids[level]
