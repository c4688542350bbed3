"""Writes one PSA user embedding per user: OUT/<7-digit user id>.npy, float32, shape (hidden,).

    python scripts/embed_users.py --config configs/embed_users.py --workdir OUT \
        --config.model=/path/to/Qwen2.5-7B-Instruct [--config.users=1-100,205]

Per user (as the official PSAlign code): the profile fills the prompt template
(`safealign_jax.user_embedding.profile_prompt`), the prompt is one user message rendered with the
tokenizer's chat template and `add_generation_prompt=True`, a batch is LEFT-padded and run once
through the causal LM with `output_hidden_states=True`, and the embedding is the mean over the
non-pad tokens of `hidden_states[-1]`. In transformers 5 `capture_outputs(tie_last_hidden_states=
True)` (utils/output_capturing.py, used by Qwen2Model/LlamaModel.forward) overwrites
`hidden_states[-1]` with `last_hidden_state`, i.e. the output AFTER the final RMSNorm (in 4.x the
last entry was appended after `self.norm` too). Differences from the official code, none of which
change the result beyond rounding: position ids count only real tokens (RoPE is relative, so the
official shift by the padding is equivalent), pad positions are zeroed with `where` (a fully
masked pad row cannot turn the sum into NaN), the mean is taken in float32, no truncation, and
no extra special tokens at tokenization (the chat template already has them; Qwen2 adds none).
Files already in OUT are skipped, so an interrupted run resumes; each file is written atomically.

Installed as `safealign-embed-users --config embed_users --workdir OUT ...`.
"""

import os

from tqdm import tqdm

from safealign_jax import cli
from safealign_jax.data.users import read_users
from safealign_jax.errors import check
from safealign_jax.user_embedding import (
    chat_messages,
    embedding_path,
    profile_prompt,
    save_embedding,
    select_users,
)


def read_template(path: str) -> str:
    check(bool(path) and os.path.isfile(path), f"--config.template={path!r}: no such prompt template file.")
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_model(folder: str, dtype_name: str, device: str):
    """(tokenizer, model) of a local causal-LM folder; the tokenizer pads on the left."""
    check(bool(folder) and os.path.isfile(os.path.join(folder, "config.json")),
          f"--config.model={folder!r}: not a local model folder (no config.json).")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    check(bool(tokenizer.chat_template), f"{folder}: the tokenizer has no chat template.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check(tokenizer.pad_token is not None, f"{folder}: the tokenizer has neither a pad nor an eos token.")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name))
    return tokenizer, model.to(device).eval()


def embed(tokenizer, model, texts: list[str]):
    """(B, hidden) float32 numpy: mean over non-pad tokens of the last (final-normed) hidden layer."""
    import torch

    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = inputs.to(model.device)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(**inputs, position_ids=positions, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-1].float()
        keep = mask.bool().unsqueeze(-1)
        total = torch.where(keep, hidden, torch.zeros_like(hidden)).sum(dim=1)
        return (total / keep.sum(dim=1)).cpu().numpy()


def run(config, workdir):
    check(config.batch_size >= 1, f"--config.batch_size={config.batch_size} must be >= 1.")
    check(config.dtype in ("float32", "bfloat16"), f"--config.dtype={config.dtype!r} must be float32 or bfloat16.")
    users = read_users(config.users_csv)
    template = read_template(config.template)
    ids = select_users(users, config.users)
    prompts = {uid: profile_prompt(users[uid], template) for uid in ids}
    os.makedirs(workdir, exist_ok=True)
    todo = [uid for uid in ids if not os.path.exists(embedding_path(workdir, uid))]
    print(f"{len(ids) - len(todo)} of {len(ids)} embeddings already present in {workdir}")
    if not todo:
        return
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load_model(config.model, config.dtype, device)
    with tqdm(total=len(todo), unit="user") as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start: start + config.batch_size]
            texts = [
                tokenizer.apply_chat_template(chat_messages(prompts[uid]), tokenize=False, add_generation_prompt=True)
                for uid in batch
            ]
            for uid, vector in zip(batch, embed(tokenizer, model, texts), strict=True):
                save_embedding(workdir, uid, vector)
            bar.update(len(batch))
    print(f"wrote {len(todo)} embeddings to {workdir}")


def main() -> None:
    cli.main(run)
