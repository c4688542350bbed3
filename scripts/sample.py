"""Generates one PNG per prompt, a manifest (JSONL) and a contact sheet; resumable.

    python scripts/sample.py --config configs/sample.py --workdir OUT \
        --config.model=PIPELINE --config.prompts=PROMPTS.csv [--config.steps=50 ...]

Images already in OUT are skipped, so an interrupted run continues where it stopped.
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from safealign_jax import cli
from safealign_jax.data.eval_prompts import PromptRow, read_prompt_csv
from safealign_jax.errors import check
from safealign_jax.images import contact_sheet, save_png
from safealign_jax.pipeline import generate, load_pipeline
from safealign_jax.schedulers import SAMPLER_NAMES

CONFIG = cli.define_flags()


def read_prompts(path: str) -> list[PromptRow]:
    """Prompt rows from a .csv (prompt/caption column) or a .txt file (one prompt per line)."""
    check(bool(path), "--config.prompts is empty: give a .txt or .csv prompt file.")
    check(os.path.isfile(path), f"{path}: no such prompt file.")
    if path.endswith(".csv"):
        return read_prompt_csv(path)
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return [PromptRow(index=i, id=str(i), prompt=p) for i, p in enumerate(lines) if p.strip()]


def image_name(row: PromptRow) -> str:
    """`00012.png`, or `00012_<file_name stem>.png` when the prompt file names its images."""
    stem = os.path.splitext(row.id)[0]
    if stem == str(row.index):
        return f"{row.index:05d}.png"
    return f"{row.index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:80]}.png"


def main(config, workdir):
    check(config.sampler in SAMPLER_NAMES, f"--config.sampler={config.sampler!r} is unknown (expected one of {', '.join(SAMPLER_NAMES)}).")
    check(config.steps >= 1, f"--config.steps={config.steps} must be >= 1.")
    check(config.batch_size >= 1, f"--config.batch_size={config.batch_size} must be >= 1.")
    check(config.dtype in ("float32", "bfloat16"), f"--config.dtype={config.dtype!r} must be float32 or bfloat16.")
    rows = read_prompts(config.prompts)
    if config.limit:
        rows = rows[: config.limit]
    check(bool(rows), f"{config.prompts}: no prompts.")
    pipe = load_pipeline(config.model, dtype=jnp.dtype(config.dtype))
    os.makedirs(workdir, exist_ok=True)
    settings = {k: config[k] for k in ("steps", "sampler", "guidance", "guidance_rescale", "negative_prompt", "height", "width")}
    todo = [r for r in rows if not os.path.exists(os.path.join(workdir, image_name(r)))]
    print(f"{len(rows) - len(todo)} of {len(rows)} images already present in {workdir}")
    with open(os.path.join(workdir, "manifest.jsonl"), "a") as manifest, tqdm(total=len(todo), unit="img") as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start: start + config.batch_size]
            seeds = [r.seed if config.use_file_seeds and r.seed is not None else config.seed + r.index for r in batch]
            images = generate(
                pipe, [r.prompt for r in batch], seeds,
                negative_prompts=[config.negative_prompt] * len(batch),
                num_steps=config.steps, guidance=config.guidance, sampler=config.sampler,
                guidance_rescale=config.guidance_rescale,
                height=config.height or None, width=config.width or None,
            )
            for row, seed, image in zip(batch, seeds, images, strict=True):
                save_png(image, os.path.join(workdir, image_name(row)))
                manifest.write(json.dumps({"file": image_name(row), "prompt": row.prompt, "seed": seed, "row": row.index, **settings}) + "\n")
            manifest.flush()
            bar.update(len(batch))
    shown = [np.asarray(Image.open(os.path.join(workdir, image_name(r))).convert("RGB")) for r in rows[: config.contact_sheet_max]]
    save_png(contact_sheet(shown), os.path.join(workdir, "contact_sheet.png"))
    print(f"wrote {len(todo)} images, manifest.jsonl and contact_sheet.png to {workdir}")


if __name__ == "__main__":
    cli.run(main, CONFIG)
