"""The JSONL line reader shared by the pairs and Sage readers: line numbers, blank lines, BOM and
a non-UTF-8 file reported as one UserError by both readers."""

import pytest

from safealign_jax import UserError
from safealign_jax.data import pairs, sage, validation
from safealign_jax.data.jsonl import jsonl_lines


def test_lines_numbered_from_one_with_blank_lines_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"b": 2}\r\nnot json\n')
    assert list(jsonl_lines(path)) == [(1, '{"a": 1}\n'), (4, '{"b": 2}\n'), (5, "not json\n")]


def test_non_utf8_file_is_one_user_error_in_both_readers(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(b'{"caption": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata\.jsonl: not a UTF-8 JSONL file"):
        list(jsonl_lines(path))
    with pytest.raises(UserError, match="not a UTF-8 JSONL file"):
        sage.read_split(path, tmp_path, {}, validation.Report())
    with pytest.raises(UserError, match="not a UTF-8 JSONL file"):
        list(pairs.table_rows(path))
