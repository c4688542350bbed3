"""Which user a PSA image is generated for: a user id, a safety level or an embedding file, resolved
to (user id, embedding (E,) float32).

    user_id, vector = resolve_user_embedding(level=3, users="sage/users", embeddings="sage/embeddings")
    user_id, vector = resolve_user_embedding(user_id="30", embeddings="emb/", embed_dim=3584)
    user_id, vector = resolve_user_embedding(user_embedding="emb/0000030.npy")

Levels (docs/METHODS.md section 3; PSA, arXiv 2508.01151): by default the table of the official evaluation
(`data.users.PUBLISHED_LEVEL_USERS`: L0 0001001 (permissive), L1 0000797, L2 0000697, L3 0000002,
L4 0000742, L5 0000501). A center_users.csv is read only when one is named (`center_users=`):
levels 1..5 are then its users from least to most restrictive by number of banned categories
(ties in file order), which cannot reproduce the official table (its L2 and L3 both ban four).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safealign_jax.data import users as users_lib
from safealign_jax.errors import UserError

USERS = "users.csv"


def _users_csv(users: str) -> Path | None:
    """The users.csv named by `users` (the file, or the Sage users folder holding it); None when
    `users` is empty or the folder has none."""
    if not users:
        return None
    path = Path(users)
    if path.is_file():
        return path
    if path.is_dir():
        return path / USERS if (path / USERS).is_file() else None
    raise UserError(f"--config.users={users}: no such users.csv or users folder.")


def level_user_ids(center_users: str = "") -> tuple[tuple[str, ...], str]:
    """(user ids of levels 0..5, where they came from): the official evaluation's table, or the
    levels derived from the center_users.csv file `center_users` when one is named."""
    if not center_users:
        return users_lib.PUBLISHED_LEVEL_USERS, "the official evaluation's level table"
    if not Path(center_users).is_file():
        raise UserError(f"--config.center_users={center_users}: no such center_users.csv file.")
    return users_lib.level_users(users_lib.read_center_users(center_users)), str(center_users)


def load_embedding(path, embed_dim: int | None = None) -> np.ndarray:
    """A user embedding .npy file -> (E,) float32 ((1, E) is squeezed); UserError if it is not a
    finite float vector, or not of width `embed_dim` when given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"user embedding file {path} does not exist.")
    try:
        value = np.squeeze(np.load(path, allow_pickle=False))
    except (ValueError, OSError) as error:
        raise UserError(f"user embedding file {path} cannot be read as .npy ({error}).") from error
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.floating):
        raise UserError(f"user embedding file {path}: shape {value.shape} dtype {value.dtype}, "
                        "expected a float vector (E,).")
    if embed_dim is not None and value.shape[0] != embed_dim:
        raise UserError(f"user embedding file {path} has {value.shape[0]} values, but the adapter "
                        f"expects {embed_dim} (psa.embed_dim).")
    if not np.all(np.isfinite(value)):
        raise UserError(f"user embedding file {path} contains NaN or infinite values.")
    return value.astype(np.float32)


def resolve_user_embedding(
    *,
    user_id: str = "",
    level: int = -1,
    users: str = "",
    center_users: str = "",
    embeddings: str = "",
    user_embedding: str = "",
    embed_dim: int | None = None,
) -> tuple[str, np.ndarray]:
    """(7-digit user id, embedding (E,) float32) of the user to generate for.

    Exactly one of: `user_embedding` (an .npy file; the id is `user_id` if given, else the file
    stem), `user_id` (its `{id}.npy` is read from the `embeddings` folder), or `level` in 0..5
    (its user as `level_user_ids(center_users)`, embedding from `embeddings`). `users`: users.csv or
    the Sage users folder; when it holds users.csv a `user_id` must be in it.
    `embed_dim`: the adapter's expected width E (checked when given). Every failure is a
    one-line UserError.
    """
    if user_embedding:
        if level >= 0:
            raise UserError("--config.user_embedding and --config.level both given; choose one.")
        name = user_id or Path(user_embedding).stem
        uid = users_lib.format_user_id(name, "--config.user_id") if name.isdigit() else name
        return uid, load_embedding(user_embedding, embed_dim)
    if level >= 0:
        if user_id:
            raise UserError("--config.user_id and --config.level both given; choose one.")
        ids, _ = level_user_ids(center_users)
        if not 0 <= level < len(ids):
            raise UserError(f"--config.level={level} is not in 0..{len(ids) - 1}.")
        uid = ids[level]
    elif user_id:
        uid = users_lib.format_user_id(user_id, "--config.user_id")
        users_csv = _users_csv(users)
        if users_csv is not None and uid not in users_lib.read_users(users_csv):
            raise UserError(f"--config.user_id={user_id}: user {uid} is not in {users_csv}.")
    else:
        raise UserError("the PSA adapter needs a user: give --config.user_id, --config.level or "
                        "--config.user_embedding.")
    if not embeddings:
        raise UserError(f"user {uid}: --config.embeddings (folder of {{user_id}}.npy) is empty.")
    if not Path(embeddings).is_dir():
        raise UserError(f"--config.embeddings={embeddings}: no such folder.")
    file = Path(embeddings) / f"{uid}.npy"
    if not file.is_file():
        raise UserError(f"user {uid} has no embedding {file} (make it with scripts/embed_users.py).")
    return uid, load_embedding(file, embed_dim)
