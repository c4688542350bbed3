"""Build-time validation: every rejected row is counted and reported by file and line.

Readers append a `Problem` to a `Report` for each row or file they cannot use (and leave that
row out); `enforce` then applies the policy: "fail" raises a UserError listing the counts and the
first problems, "skip" keeps the good records and returns the report (also saved with the built
data set). Nothing is dropped without a Problem.

Problem kinds used by the readers:
  bad_row            unparseable row / missing field / image name not in the expected form
  empty_prompt       prompt or caption empty
  unknown_category   category not in the data set's taxonomy
  duplicate_pair     a row repeats an earlier pair row (same index, kind and category)
  conflicting_pair   rows of one pair disagree (prompt text, image name, images)
  incomplete_pair    harmful or safe half of a pair missing
  caption_not_found  parquet caption that is in no pair of the prompt table
  missing_image / unreadable_image
  unknown_user       user id absent from users.csv / user id and file name disagree
  missing_embedding / bad_embedding   a user's .npy file absent / unreadable, wrong size, not finite
  user_without_embedding   a record left out because its user has no usable embedding
  rule_violation     Sage chosen/rejected contradict the released preference rule
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from safealign_jax.errors import UserError

POLICIES = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One unusable row or file. `line` is 1-based (header = line 1), None for whole files."""

    kind: str
    file: str
    line: int | None
    detail: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {self.detail}"


@dataclasses.dataclass
class Report:
    """Problems found while reading one data set, plus counts of what was kept."""

    problems: list[Problem] = dataclasses.field(default_factory=list)
    kept: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, file, line: int | None, detail: str) -> None:
        self.problems.append(Problem(kind, str(file), line, detail))

    def counts(self) -> dict[str, int]:
        """Number of problems per kind."""
        return dict(collections.Counter(p.kind for p in self.problems))

    def counts_by_file(self) -> dict[str, dict[str, int]]:
        """Number of problems per file and kind."""
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for p in self.problems:
            out[p.file][p.kind] += 1
        return {f: dict(c) for f, c in out.items()}

    def summary(self, first: int = 5) -> str:
        """Counts, then the first `first` problems, one per line."""
        lines = [f"{len(self.problems)} problem(s): {self.counts()}; kept: {self.kept}"]
        lines += [f"  {p}" for p in self.problems[:first]]
        if len(self.problems) > first:
            lines.append(f"  ... and {len(self.problems) - first} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "counts_by_file": self.counts_by_file(),
            "kept": dict(self.kept),
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def write_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UserError(f"validation policy {policy!r} is not one of {', '.join(POLICIES)}.")


def enforce(report: Report, policy: str, what: str) -> Report:
    """Raises UserError under policy "fail" if `report` has problems; returns it otherwise."""
    check_policy(policy)
    if policy == "fail" and report.problems:
        raise UserError(
            f"{what}: {len(report.problems)} unusable row(s) or file(s) {report.counts()} "
            f"(set policy 'skip' to leave them out and get a report); first ones: "
            + "; ".join(str(p) for p in report.problems[:3])
        )
    return report


def image_problem(data: bytes) -> str | None:
    """None if `data` decodes as an image (PIL header + `verify`), else the reason."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not a known image format"
    except Exception as error:  # PIL raises many types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


def image_file_problem(path: Path) -> tuple[str, str] | None:
    """None if `path` is a file that decodes as an image, else (problem kind, detail)."""
    if not path.is_file():
        return "missing_image", f"image {path} does not exist"
    reason = image_problem(path.read_bytes())
    if reason is not None:
        return "unreadable_image", f"image {path} cannot be decoded ({reason})"
    return None
