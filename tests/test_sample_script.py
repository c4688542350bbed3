"""scripts/sample.py: PNGs, manifest, contact sheet, resume, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipelines import build_sd

ROOT = Path(__file__).resolve().parents[1]


def sample(workdir, *overrides):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample.py"), "--config", str(ROOT / "configs/sample.py"),
         "--workdir", str(workdir), *overrides],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("sample"))


def test_generates_and_resumes(model, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('file_name,caption\na.jpg,the cat\nb.jpg,"a dog, running"\nc.jpg,the sky\n')
    out = tmp_path / "out"
    args = (f"--config.model={model}", f"--config.prompts={prompts}", "--config.steps=2", "--config.batch_size=2")
    result = sample(out, *args, "--config.limit=2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000_a.png", "00001_b.png"]
    result = sample(out, *args)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 images already present" in result.stdout
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000_a.png", "00001_b.png", "00002_c.png"]
    assert records[1]["prompt"] == "a dog, running" and records[1]["seed"] == 1
    assert (out / "contact_sheet.png").exists()


@pytest.mark.parametrize(
    ("content", "override", "fragment"),
    [
        ("file_name,text\na.jpg,the cat\n", "", "prompt/caption"),
        ("caption\nthe cat\n", "--config.sampler=heun", "sampler='heun' is unknown"),
    ],
)
def test_bad_input_is_one_line(model, tmp_path, content, override, fragment):
    prompts = tmp_path / "p.csv"
    prompts.write_text(content)
    result = sample(tmp_path / "out", f"--config.model={model}", f"--config.prompts={prompts}", *[o for o in [override] if o])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
