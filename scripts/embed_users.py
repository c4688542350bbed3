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

The command is safealign_jax/commands/embed_users.py (installed as `safealign-embed-users`); `main(config,
workdir)` is its work, as in every script.
"""

from safealign_jax.commands import embed_users as command

main = command.run

if __name__ == "__main__":
    command.main()
