"""Merges safety experts (LoRA checkpoints) into one model; see configs/merge.py.

    python scripts/merge.py --config configs/merge.py:comerge --workdir runs/merged \
        --config.experts=runs/experts/experts --config.calibration.cache_dir=cache/coprov2 \
        [--config.statistics_from=own_category]
    python scripts/merge.py --config configs/merge.py:fusion --workdir runs/fused \
        --config.experts=runs/experts/experts --config.fusion_concepts=concepts.csv \
        [--config.fusion_preserve=keep.txt] [--config.fusion_rest=comerge ...]

Writes workdir/checkpoints/0 (a {"delta"} or, with output.form=svd, a {"lora"} checkpoint that
scripts/export.py and scripts/sample.py accept like a trained LoRA) and workdir/merge_summary.json
(per layer: |dW|, weights won by each expert (comerge), SVD relative reconstruction error; the
merged delta's total Frobenius norm; timings).

The command is safealign_jax/commands/merge.py (installed as `safealign-merge`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import merge as command

main = command.run

if __name__ == "__main__":
    command.main()
