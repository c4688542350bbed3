"""Canonical safety-category names of the two data sets, and the file spellings they accept.

CoProV2 (SafetyDPO) writes its categories as ``Hate, sexual, Violence, Shocking, Illegal Activity,
Harrasment, self-harm``; I2P writes the same taxonomy in lower case; Sage (PSA) writes
``Hate, Harassment, Violence, Self-Harm, Sexuality, Shocking, Propaganda`` in users.csv and lower
case (``self-harm``) in its image names. Spellings are matched ignoring case, spaces, '-' and
'_', plus the known misspelling 'Harrasment'. Records keep the spelling of the file next to the
canonical name.
"""

from __future__ import annotations

import dataclasses
import re

from safealign_jax.errors import UserError


def _key(spelling: str) -> str:
    """'Self-Harm', 'self_harm', ' self harm ' -> 'selfharm'."""
    return re.sub(r"[\s_\-]+", "", spelling).lower()


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """A fixed list of category names and the spellings that map to them."""

    name: str
    categories: tuple[str, ...]
    misspellings: tuple[tuple[str, str], ...] = ()

    def canonical(self, spelling: str) -> str | None:
        """The canonical name for `spelling`, or None if it is not a category of this taxonomy."""
        key = _key(spelling)
        for name in self.categories:
            if _key(name) == key:
                return name
        for wrong, right in self.misspellings:
            if _key(wrong) == key:
                return right
        return None

    def require(self, spelling: str, where: str) -> str:
        """Like `canonical` but raises UserError naming `where` for an unknown spelling."""
        name = self.canonical(spelling)
        if name is None:
            raise UserError(
                f"{where}: unknown {self.name} category {spelling!r}; expected one of "
                f"{', '.join(self.categories)}."
            )
        return name

    def sort(self, names) -> tuple[str, ...]:
        """Canonical names, deduplicated, in taxonomy order."""
        names = set(names)
        return tuple(c for c in self.categories if c in names)


def select(spelling: str, names, where: str) -> str:
    """The category among `names` (a data set's own, e.g. a cache's category index) that
    `spelling` means: the same text, else the same ignoring case, spaces, '-' and '_', else its
    CoProV2 name ('Harrasment' -> 'Harassment'). Free-text categories of your own pairs work
    alike. UserError naming `where` and listing `names` otherwise."""
    names = list(names)
    if spelling in names:
        return spelling
    for name in names:
        if _key(name) == _key(spelling):
            return name
    if COPROV2.canonical(spelling) in names:
        return COPROV2.canonical(spelling)
    raise UserError(f"{where}: unknown category {spelling!r}; the data set's categories are "
                    f"{', '.join(map(repr, names)) or 'none'}.")


def position(name: str, names) -> int:
    """Where category `name` stands in `names` (matched as `select` does: the same text, else the
    same ignoring case, spaces, '-' and '_', else its CoProV2 name), or -1 if it is absent."""
    names = list(names)
    try:
        return names.index(select(name, names, "position"))
    except UserError:
        return -1


def slug(category: str) -> str:
    """A file/config-friendly name: 'Illegal Activity' -> 'illegal_activity'."""
    return re.sub(r"[\s\-]+", "_", category.strip()).lower()


COPROV2 = Taxonomy(
    name="CoProV2",
    categories=(
        "Hate",
        "Harassment",
        "Violence",
        "Self-Harm",
        "Sexual",
        "Shocking",
        "Illegal Activity",
    ),
    misspellings=(("Harrasment", "Harassment"),),
)

SAGE = Taxonomy(
    name="Sage",
    categories=("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"),
    misspellings=(("Harrasment", "Harassment"),),
)
