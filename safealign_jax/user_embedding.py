"""PSA user embeddings: the profile prompt, user selection and the per-user .npy files.

The LLM forward itself lives in scripts/embed_users.py (PyTorch/transformers); this module stays
torch-free. The prompt is filled the way the official PSAlign `get_embeds` code does: it reads
users.csv with pandas and replaces each `<<NAME>>` placeholder of
`users/embedding_prompt_template.txt` with `str(cell)`. Two consequences, reproduced here:

- Banned/Allowed lists appear as the file's Python list text, e.g. "['Propaganda', 'Sexuality']"
  and "[]". users.csv writes them alphabetically (all 1,001 rows), so they are rebuilt as
  `str(sorted(names))` from the parsed profile (data/users.py keeps the taxonomy order).
- pandas reads the Religion value 'None' (341 users) and empty cells as NaN, so the official
  prompt says "Religion: nan" (pandas >= 2.0 lists 'None' among its default NA strings; inferred,
  the released embeddings cannot be checked against a 7B model here). `MISSING_TEXT` is that text.

The prompt is then the content of one user message, rendered with the tokenizer's chat template
and `add_generation_prompt=True` (as the official code), left-padded and pooled by the script.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from safealign_jax.convert.files import atomic_path
from safealign_jax.data.users import UserProfile, format_user_id
from safealign_jax.errors import UserError

MISSING_TEXT = "nan"  # str(float('nan')): what pandas turns 'None' / '' into
# pandas.read_csv default NA strings (the word-like ones; the rest are spellings of NaN numbers)
_PANDAS_NA = ("", "None", "NA", "N/A", "NULL", "NaN", "nan", "null", "n/a", "<NA>")


def _cell(value: str) -> str:
    return MISSING_TEXT if value is None or value in _PANDAS_NA else value


def placeholders(user: UserProfile) -> dict[str, str]:
    """{'<<AGE>>': '18', ..., '<<BANNED>>': "['Propaganda', 'Sexuality']"} for one user."""
    return {
        "<<AGE>>": str(user.age),
        "<<AGE_GROUP>>": _cell(user.age_group),
        "<<GENDER>>": _cell(user.gender),
        "<<RELIGION>>": _cell(user.religion),
        "<<MENTAL>>": _cell(user.mental_condition),
        "<<PHYSICAL>>": _cell(user.physical_condition),
        "<<BANNED>>": str(sorted(user.banned)),
        "<<ALLOWED>>": str(sorted(user.allowed)),
    }


def profile_prompt(user_row: UserProfile, template_text: str) -> str:
    """The template with every `<<NAME>>` placeholder replaced (in the official order)."""
    values = placeholders(user_row)
    missing = [name for name in values if name not in template_text]
    if missing:
        raise UserError(f"embedding prompt template lacks the placeholders {', '.join(missing)}.")
    prompt = template_text
    for name, value in values.items():
        prompt = prompt.replace(name, value)
    return prompt


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The chat given to `apply_chat_template`: one user message holding the prompt."""
    return [{"role": "user", "content": prompt}]


def select_users(users: Mapping[str, UserProfile], spec: str) -> list[str]:
    """User ids chosen by `spec`: 'all' (or ''), or comma-separated ids and ranges
    ('1-100,205,0000999'), in the order given, duplicates dropped."""
    spec = spec.strip()
    if spec in ("", "all"):
        return list(users)
    chosen: dict[str, None] = {}
    for part in spec.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip() for b in bounds):
            raise UserError(f"--config.users: {part.strip()!r} is not an id or a range like '1-100'.")
        first, last = (int(format_user_id(b, "--config.users")) for b in (bounds[0], bounds[-1]))
        if last < first:
            raise UserError(f"--config.users: range {part.strip()!r} is empty.")
        for number in range(first, last + 1):
            user_id = f"{number:07d}"
            if user_id not in users:
                raise UserError(f"--config.users: user {user_id} is not in the users file ({len(users)} users).")
            chosen[user_id] = None
    return list(chosen)


def embedding_path(folder: str, user_id: str) -> str:
    """`folder/0000033.npy`."""
    return os.path.join(folder, f"{user_id}.npy")


def save_embedding(folder: str, user_id: str, vector) -> str:
    """Writes `vector` as a float32 (hidden,) .npy atomically (temp file + rename); returns the path."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"embedding of user {user_id} has shape {vector.shape}, expected (hidden,).")
    path = embedding_path(folder, user_id)
    with atomic_path(path, ".tmp") as tmp, open(tmp, "wb") as f:
        np.save(f, vector)
    return path
