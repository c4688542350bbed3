"""scripts/evaluate.py end to end on a tiny pipeline: images, scores, report, comparison, resume,
and a missing model folder as a one-line error."""

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from pipelines import build_sd

from safealign_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = 'file_name,caption,user_id\na.jpg,the cat,1\nb.jpg,"a dog, running",2\nc.jpg,the sky,1\nd.jpg,a red car,2\n'
USERS = """Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories
18,adolescents,male,Islam,healthy,healthy,"['Propaganda', 'Sexuality']","['Harassment', 'Hate', 'Self-Harm', 'Shocking', 'Violence']"
40,adults,female,None,healthy,healthy,"[]","['Harassment', 'Hate', 'Propaganda', 'Self-Harm', 'Sexuality', 'Shocking', 'Violence']"
"""


@pytest.fixture(scope="module")
def judge_url():
    """A keyless local judge: every image passes; in comparisons image A wins."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            text = '{"winner": "A", "reason": "r"}' if "winner" in body else '{"pass": true, "reason": "r"}'
            payload = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD pipeline, a tiny random transformers CLIP (with tokenizer) and Q16 prompts."""
    import torch
    from fixtures_tokenizer import write_tiny_clip_tokenizer
    from transformers import CLIPConfig, CLIPModel

    tmp = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    # projection_dim also in the sub-configs, as in the hub's CLIP config.json files
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=530, max_position_embeddings=16, bos_token_id=528, eos_token_id=529,
                         pad_token_id=529, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16,
    )
    clip = tmp / "clip"
    CLIPModel(config).save_pretrained(clip)
    write_tiny_clip_tokenizer(clip, model_max_length=16)
    prompts = tmp / "q16.npy"
    np.save(prompts, np.random.default_rng(0).standard_normal((2, 16)).astype(np.float16))
    csv = tmp / "prompts.csv"
    csv.write_text(PROMPTS)
    users = tmp / "users.csv"
    users.write_text(USERS)
    return {"model": build_sd(tmp), "clip": str(clip), "q16": str(prompts), "prompts": str(csv), "users": str(users)}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(folders):
    return {
        "model": folders["model"], "prompts_file": folders["prompts"], "name": "tiny",
        "models.q16_clip": folders["clip"], "models.q16_prompts": folders["q16"],
        "models.clip_score": folders["clip"], "models.clip_score_kind": "transformers",
        "metrics.nudenet": False, "generation.steps": 2, "generation.batch_size": 2,
        "metrics.grid_images": 4, "psa.users": folders["users"],
    }


def config(**values):
    c = load("configs/evaluate.py", "evaluate_config").get_config("custom")
    for key, value in values.items():
        node, _, leaf = key.rpartition(".")
        (c[node] if node else c)[leaf] = value
    return c


def test_report_for_a_tiny_model(folders, judge_url, tmp_path, capsys):
    script = load("scripts/evaluate.py", "evaluate_script")
    judge = {"metrics.pass_rate": True, "judge.base_url": judge_url, "judge.api_key_env": ""}
    script.main(config(**overrides(folders), **judge), str(tmp_path))
    assert "tiny/custom: generating 4 of 4 images" in capsys.readouterr().out
    method = tmp_path / "tiny"
    report = json.loads((method / "report.json").read_text())
    custom = report["benchmarks"]["custom"]
    assert custom["n"] == 4 and 0 <= custom["ip"] <= 1 and custom["detectors"] == ["q16"]
    assert custom["clip_score_standard"] == pytest.approx(max(custom["clip_score"], 0) / 40, abs=0.05)
    records = [json.loads(line) for line in (method / "custom/manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the cat", "a dog, running", "the sky", "a red car"]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    assert [r["user"] for r in records] == ["0000001", "0000002"] * 2
    assert custom["pass_rate"] == {"pass_rate": 1.0, "n": 4, "errors": 0}
    scores = [json.loads(line) for line in (method / "custom/scores.jsonl").read_text().splitlines()]
    assert all(0 <= s["q16_probability"] <= 1 and "clip_cosine" in s for s in scores)
    for name in ("report.md", "ip.png", "grid_custom.png"):
        assert (method / name).exists(), name
    assert "| custom | 4 |" in (method / "report.md").read_text()
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["tiny"] and table["columns"] == []

    script.main(config(**overrides(folders), **judge), str(tmp_path))  # resumes: nothing to generate
    assert "generating" not in capsys.readouterr().out
    assert json.loads((method / "report.json").read_text()) == report

    # a second method with the same images, judged against "tiny": A wins, so the method wins
    # exactly on the pairs shown method-first
    shutil.copytree(method / "custom", tmp_path / "copy" / "custom")
    second = {**overrides(folders), **judge, "name": "copy", "metrics.win_rate": True, "judge.baseline": "tiny"}
    script.main(config(**second), str(tmp_path))
    win = json.loads((tmp_path / "copy/report.json").read_text())["benchmarks"]["custom"]["win_rate"]
    assert win["n"] == 4 and win["wins"] == 4 - win["baseline_first"] and win["baseline"] == "tiny"
    assert [r["method"] for r in json.loads((tmp_path / "comparison.json").read_text())["rows"]] == ["copy", "tiny"]
    with pytest.raises(UserError, match="holds images made with other settings"):
        script.main(config(**{**overrides(folders), "generation.guidance": 3.0}), str(tmp_path))
    with pytest.raises(UserError, match="unknown benchmark 'nsfw'"):
        script.main(config(**{**overrides(folders), "benchmarks": "custom,nsfw"}), str(tmp_path))


def test_missing_model_folder_is_one_line(folders, tmp_path):
    args = [f"--config.{k}={v}" for k, v in overrides(folders).items() if k != "models.q16_clip"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/evaluate.py"), "--config", f"{ROOT / 'configs/evaluate.py'}:custom",
         "--workdir", str(tmp_path), *args, "--config.models.q16_clip=/no/such/clip"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--config.models.q16_clip='/no/such/clip': no such folder" in lines[0], result.stderr
    assert not (tmp_path / "tiny").exists()


def test_psa_run_generates_for_each_rows_user(folders, tmp_path):
    """A PSA adapter checkpoint: each image uses its row's user embedding; a level fixes one user."""
    import jax
    from flax import traverse_util

    from safealign_jax import adapter
    from safealign_jax.data.eval_prompts import PromptRow
    from safealign_jax.eval import generation
    from safealign_jax.models import load_unet
    from safealign_jax.runs import save_trained

    _, unet_params = load_unet(folders["model"])
    tree = adapter.init(jax.random.key(0), unet_params, embed_dim=8)
    flat = traverse_util.flatten_dict(tree)
    rng = np.random.default_rng(0)  # random to_v_ip (a constant one cancels: user tokens are layer-normed)
    tree = traverse_util.unflatten_dict(
        {k: rng.standard_normal(v.shape).astype(np.float32) if k[-1] == "to_v_ip" else v for k, v in flat.items()})
    save_trained(str(tmp_path / "psa"), {"adapter": tree}, {"psa": {"scale": 1.0}}, {"path": folders["model"], "sha256": ""})
    embeddings = tmp_path / "emb"
    embeddings.mkdir()
    for number in (1, 2):
        np.save(embeddings / f"000000{number}.npy", np.random.default_rng(number).standard_normal(8).astype(np.float32))
    psa = generation.load_model(folders["model"], str(tmp_path / "psa"))
    rows = [PromptRow(index=i, id=str(i), prompt="the cat", seed=7, user_id=u) for i, u in enumerate(["0000001", "0000002"])]
    settings = generation.GenerationSettings(steps=2, batch_size=2)
    generation.generate_run(psa, rows, str(tmp_path / "run"), settings, generation.row_users(rows), str(embeddings), progress=False)
    records = generation.read_manifest(str(tmp_path / "run"))
    assert [r["user"] for r in records] == ["0000001", "0000002"]
    images = generation.load_images(str(tmp_path / "run"), records)
    assert np.abs(images[0].astype(int) - images[1]).max() > 0  # same prompt and seed, other user
    assert generation.row_users(rows, level=0) == ["0001001"] * 2
    assert generation.row_users(rows, user_id="33") == ["0000033"] * 2
    with pytest.raises(UserError, match=r"0000003\.npy does not exist"):
        generation.generate_run(psa, rows, str(tmp_path / "run3"), settings, ["0000001", "0000003"], str(embeddings))
