"""Closed-form concept editing of the cross-attention key / value layers; see configs/erase.py.

    python scripts/erase.py --config configs/erase.py --workdir runs/erase \
        --config.model=/models/sd15 --config.edits=edits.csv [--config.preserve=keep.txt]

Writes workdir/checkpoints/0 (a {"delta"} or, with output.form=svd, a {"lora"} run that
scripts/sample.py, export.py and evaluate.py accept) and workdir/erase_summary.json; prints the
norm of every edited layer's delta, the total, and the summary as one JSON line.

The command is safealign_jax/commands/erase.py (installed as `safealign-erase`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import erase as command

main = command.run

if __name__ == "__main__":
    command.main()
