"""The README's main command: safety alignment end to end in the synthetic world, on any CPU.

    python scripts/demo.py --config configs/demo.py --workdir runs/demo

Leaves WORKDIR/report.md + report.json (targets, per-method and PSA tables), plots and image
grids (PNG), the exported Co-Merge LoRA (peft) and PSA adapter (IP-Adapter layout). Re-runs reuse
the cached base model and every finished stage. See safealign_jax/synthetic/demo.py.

Installed as `safealign-demo --config demo[:quick] --workdir runs/demo`.
"""

from safealign_jax import cli


def run(config, workdir):
    from safealign_jax.synthetic import demo, report

    results = demo.run(config, workdir)
    print(report.markdown(results, results["world"]["categories"]).split("## Methods")[0])
    print(f"wrote {workdir}/report.md, report.json, plots, grids/ and export/")


def main() -> None:
    cli.main(run)
