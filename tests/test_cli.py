"""Scripts report user mistakes in one line with exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_config_typo(tmp_path):
    result = run_script("--config", "configs/demo.py", "--config.sed=1", "--workdir", str(tmp_path))
    assert_one_line_error(result, "sed", 'Did you mean "seed"')


def test_config_wrong_type(tmp_path):
    result = run_script("--config", "configs/demo.py", "--config.seed=two", "--workdir", str(tmp_path))
    assert_one_line_error(result, "--config.seed=two")


def test_missing_config_file(tmp_path):
    result = run_script("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert_one_line_error(result, "configs/nope.py", "no such config file")


def test_bad_value_is_user_error(tmp_path):
    result = run_script("--config", "configs/demo.py:huge", "--workdir", str(tmp_path))
    assert_one_line_error(result, "huge")
