"""Generates one PNG per prompt, a manifest (JSONL) and a contact sheet; resumable.

    python scripts/sample.py --config configs/sample.py --workdir OUT \
        --config.model=PIPELINE --config.prompts=PROMPTS.csv [--config.steps=50 ...]

With a trained or merged run (`--config.checkpoint=RUN`, read by `trained.load_trained`): its LoRA
or full delta is folded in; a PSA adapter, or a user-gated PSA run (folded for that user), needs a
user (`--config.user_id` + `--config.embeddings`, `--config.level` 0..5 + `--config.users` +
`--config.embeddings`, or `--config.user_embedding` FILE.npy; see `safealign_jax.psa_users`).
`--config.model` defaults to the pipeline holding the run's base UNet. The generation itself
(names, seeds, manifest, PNG text chunks, resuming) is `safealign_jax.eval.generation`'s, with the
images in OUT itself: an interrupted run continues where it stopped; other settings or another
user in the same OUT are refused.

The command is safealign_jax/commands/sample.py (installed as `safealign-sample`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import sample as command

main = command.run

if __name__ == "__main__":
    command.main()
