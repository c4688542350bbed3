"""User embeddings: the profile prompt, and scripts/embed_users.py on a tiny random Qwen2 saved with
an offline byte-level tokenizer that has a chat template (left padding, masking, batching, resume,
one-line errors)."""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safealign_jax.data.users import read_users
from safealign_jax.errors import UserError
from safealign_jax.user_embedding import profile_prompt, save_embedding, select_users

ROOT = Path(__file__).resolve().parents[1]
SHARED_USERS = ROOT.parent / "shared/data/sage/users"
TEMPLATE = (
    "You are generating a statement.\n[User Profile]\n- Age: <<AGE>> (<<AGE_GROUP>>)\n"
    "- Gender: <<GENDER>>\n- Religion: <<RELIGION>>\n- Mental Condition: <<MENTAL>>\n"
    "- Physical Condition: <<PHYSICAL>>\n[User Safety Preferences]\n"
    "- Forbidden Content Categories: <<BANNED>>\n- Allowed Content Categories: <<ALLOWED>>\n"
)
USERS_CSV = (
    "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories\n"
    "18,adolescents,male,Islam,healthy,healthy,\"['Propaganda', 'Sexuality']\","
    "\"['Harassment', 'Hate', 'Self-Harm', 'Shocking', 'Violence']\"\n"
    "20,young adults,female,None,healthy,depression,\"['Hate', 'Harassment', 'Propaganda', 'Self-Harm', "
    "'Sexuality', 'Shocking', 'Violence']\",[]\n"
    "71,elderly,male,Christianity,visual impairment,mild anxiety disorder,[],"
    "\"['Harassment', 'Hate', 'Propaganda', 'Self-Harm', 'Sexuality', 'Shocking', 'Violence']\"\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("users")
    (folder / "users.csv").write_text(USERS_CSV)
    (folder / "template.txt").write_text(TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, data):
    """A random Qwen2 (hidden 32, 2 layers, 4 heads, 2 kv heads) + byte-level Qwen2Tokenizer folder
    (the 256 byte symbols, no merges, so one token per byte; AutoTokenizer picks Qwen2Tokenizer from
    the model_type anyway, so the tokenizer must be one)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    from safealign_jax.tiny_pipeline import byte_symbols

    vocab = {t: i for i, t in enumerate([*byte_symbols(), "<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("qwen2")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@functools.cache
def _reference_model(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _reference(folder, prompt):
    """Unpadded single-sequence forward: mean over tokens of the final-normed last hidden state."""
    import torch

    tokenizer, model = _reference_model(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        last = model.model(input_ids=ids).last_hidden_state
        tied = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(tied, last, rtol=0, atol=0)  # hidden_states[-1] is after the final norm
    return last[0].mean(0).numpy(), ids.shape[1]


def _embed(args, workdir):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/embed_users.py"), "--config", str(ROOT / "configs/embed_users.py"),
         "--workdir", str(workdir), *args],
        capture_output=True, text=True, timeout=120,
    )


def test_profile_prompt_fixture_row(data):
    users = read_users(data / "users.csv")
    prompt = profile_prompt(users["0000001"], TEMPLATE)
    assert "- Age: 18 (adolescents)" in prompt and "- Religion: Islam" in prompt
    assert "Forbidden Content Categories: ['Propaganda', 'Sexuality']\n" in prompt
    assert "Allowed Content Categories: ['Harassment', 'Hate', 'Self-Harm', 'Shocking', 'Violence']\n" in prompt
    second = profile_prompt(users["0000002"], TEMPLATE)
    assert "- Religion: nan" in second  # pandas reads 'None' as NaN in the official code
    assert "Allowed Content Categories: []" in second and "<<" not in second
    with pytest.raises(UserError, match="<<BANNED>>"):
        profile_prompt(users["0000001"], TEMPLATE.replace("<<BANNED>>", ""))


@pytest.mark.skipif(not SHARED_USERS.is_dir(), reason="../shared data absent")
def test_profile_prompt_real_users_equals_official_pandas_fill():
    """Every one of the 1,001 prompts equals the official code's pandas + str(cell) replacement."""
    pd = pytest.importorskip("pandas")
    template = (SHARED_USERS / "embedding_prompt_template.txt").read_text(encoding="utf-8")
    users = read_users(SHARED_USERS / "users.csv")
    frame = pd.read_csv(SHARED_USERS / "users.csv")
    columns = {"<<AGE>>": "Age", "<<AGE_GROUP>>": "Age_Group", "<<GENDER>>": "Gender",
               "<<RELIGION>>": "Religion", "<<MENTAL>>": "Mental_Condition",
               "<<PHYSICAL>>": "Physical_Condition", "<<BANNED>>": "Banned_Categories",
               "<<ALLOWED>>": "Allowed_Categories"}
    for (_, row), user in zip(frame.iterrows(), users.values(), strict=True):
        official = template
        for name, column in columns.items():
            official = official.replace(name, str(row[column]))
        prompt = profile_prompt(user, template)
        assert prompt == official
        assert f"- Forbidden Content Categories: {row['Banned_Categories']}\n" in prompt


def test_library_does_not_import_torch():
    code = "import sys, safealign_jax.user_embedding; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


def test_select_users(data):
    users = read_users(data / "users.csv")
    assert select_users(users, "all") == ["0000001", "0000002", "0000003"]
    assert select_users(users, "3, 1-2,0000001") == ["0000003", "0000001", "0000002"]
    for bad in ("4", "x", "2-1", "1-", "1-2-3"):
        with pytest.raises(UserError):
            select_users(users, bad)


def test_embeddings_equal_unpadded_reference_for_any_batch_size(tiny_llm, data, tmp_path):
    from safealign_jax.commands import embed_users as script

    tokenizer, model = script.load_model(str(tiny_llm), "float32", "cpu")
    users = read_users(data / "users.csv")
    prompts = [profile_prompt(u, TEMPLATE) for u in users.values()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batched = script.embed(tokenizer, model, texts)
    singles = np.concatenate([script.embed(tokenizer, model, [t]) for t in texts])
    refs, lengths = zip(*(_reference(tiny_llm, p) for p in prompts), strict=True)
    assert len(set(lengths)) == 3  # three different lengths: the batch really is left-padded
    assert batched.shape == (3, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, np.stack(refs), rtol=0, atol=1e-5)
    np.testing.assert_allclose(singles, batched, rtol=0, atol=1e-5)
    save_embedding(str(tmp_path), "0000001", batched[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001.npy"]


def test_script_writes_resumes_and_fails_in_one_line(tiny_llm, data, tmp_path):
    out = tmp_path / "emb"
    common = [f"--config.model={tiny_llm}", f"--config.users_csv={data / 'users.csv'}",
              f"--config.template={data / 'template.txt'}", "--config.batch_size=2"]
    result = _embed([*common, "--config.users=1,3"], out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000001.npy", "0000003.npy"]
    first = np.load(out / "0000001.npy")
    assert first.shape == (32,) and first.dtype == np.float32
    np.testing.assert_allclose(first, _reference(tiny_llm, profile_prompt(read_users(data / "users.csv")["0000001"],
                                                                           TEMPLATE))[0], atol=1e-5)
    stamp = (out / "0000003.npy").stat().st_mtime_ns
    result = _embed(common, out)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 embeddings already present" in result.stdout
    assert (out / "0000003.npy").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == ["0000001.npy", "0000002.npy", "0000003.npy"]

    for args, fragment in [
        ([*common, "--config.users=7"], "user 0000007 is not in the users file"),
        ([*common[1:], f"--config.model={tmp_path / 'nope'}", "--config.users=2"], "not a local model folder"),
        ([*common, f"--config.template={tmp_path / 'none.txt'}"], "no such prompt template file"),
        ([*common, f"--config.users_csv={tmp_path / 'none.csv'}"], "file not found"),
    ]:
        result = _embed(args, tmp_path / "err")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
