"""The papers' evaluation of one model ("method"): generate each benchmark's images (resumable),
score them, write report.md / report.json for the method and comparison.md over all methods
(`safealign_jax.eval.run.evaluate`).

    python scripts/evaluate.py --config configs/evaluate.py:safetydpo --workdir eval \
        --config.name=safetydpo --config.model=PIPELINE --config.checkpoint=RUN \
        --config.models.q16_clip=CLIP_L14 --config.models.inception=... --config.models.fid_reference=...

Layout: workdir/<name>/<benchmark>/{images/, manifest.jsonl, run.json, scores.jsonl},
workdir/<name>/{report.md, report.json, ip.png, grid_<benchmark>.png},
workdir/{comparison.md, comparison.json, comparison_ip.png}, workdir/judge_cache/.
Every model folder an enabled metric needs is checked before any image is generated.
SafetyDPO's own inference seeds one generator once for all prompts: to follow that protocol add
--config.generation.seeding=single_stream (`generation.image_seed`; the noise is JAX's, not torch's).

The command is safealign_jax/commands/evaluate.py (installed as `safealign-evaluate`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import evaluate as command

main = command.run

if __name__ == "__main__":
    command.main()
