"""Generates one PNG per prompt, a manifest (JSONL) and a contact sheet; resumable.

    python scripts/sample.py --config configs/sample.py --workdir OUT \
        --config.model=PIPELINE --config.prompts=PROMPTS.csv [--config.steps=50 ...]

With a trained or merged run (`--config.checkpoint=RUN`, read by `trained.load_trained`): its LoRA
or full delta is applied; a PSA adapter, or a user-gated PSA run (folded for that user), needs a
user (`--config.user_id` + `--config.embeddings`, `--config.level` 0..5 + `--config.users` +
`--config.embeddings`, or `--config.user_embedding` FILE.npy; see `safealign_jax.psa_users`).
`--config.model` defaults to the pipeline holding the run's base UNet. Images already in OUT are
skipped, so an interrupted run continues where it stopped (one user per OUT).
"""

import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from safealign_jax import cli
from safealign_jax.data.eval_prompts import PromptRow
from safealign_jax.errors import UserError, check
from safealign_jax.eval import generation
from safealign_jax.images import contact_sheet, save_png
from safealign_jax.models.resolve import resolve_model
from safealign_jax.pipeline import generate, load_pipeline
from safealign_jax.schedulers import SAMPLER_NAMES

CONFIG = cli.define_flags()


def read_prompts(path: str) -> list[PromptRow]:
    """Prompt rows from a .csv (prompt/caption column; an sd_seed column seeds its rows) or a .txt
    file (one prompt per line); `generation.read_prompts`."""
    check(bool(path), "--config.prompts is empty: give a .txt or .csv prompt file.")
    return generation.read_prompts(path)


def image_name(row: PromptRow) -> str:
    """`00012.png`, or `00012_<file_name stem>.png` when the prompt file names its images."""
    stem = os.path.splitext(row.id)[0]
    if stem == str(row.index):
        return f"{row.index:05d}.png"
    return f"{row.index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:80]}.png"


def load_checkpoint(config) -> dict:
    """generate() keyword arguments (lora / adapter / user_embeddings rows) and manifest fields
    of `config.checkpoint` and the user options; {} without a checkpoint."""
    user_options = config.user_id or config.user_embedding or config.level >= 0
    if not config.checkpoint:
        check(not user_options, "--config.user_id/level/user_embedding need a PSA --config.checkpoint.")
        return {}
    from safealign_jax.trained import load_trained

    trained = load_trained(config.checkpoint, config.checkpoint_step if config.checkpoint_step >= 0 else None)
    out = {"kwargs": {}, "manifest": {"checkpoint": config.checkpoint, "checkpoint_step": trained.step},
           "base_model": trained.base_model, "trained": trained}
    if trained.gated is not None:
        user_id, vector = _resolve_user(config, int(trained.gated["gate"]["kernel"].shape[0]), "user-gated PSA run")
        out["fold"] = lambda params: trained.folded_for_user(params, vector)
        out["manifest"].update(user_id=user_id, level=config.level, categories=list(trained.categories))
        return out
    variables = trained.unet_variables()
    if "lora" in variables:
        out["kwargs"]["lora"] = variables["lora"]
    if trained.adapter is None:
        check(not user_options, f"--config.checkpoint={config.checkpoint} has no PSA adapter, "
                                "so --config.user_id/level/user_embedding do not apply.")
        return out
    user_id, vector = _resolve_user(config, int(trained.adapter["proj"]["kernel"].shape[0]), "PSA adapter")
    scale = trained.adapter_scale if config.adapter_scale < 0 else config.adapter_scale
    out["kwargs"]["adapter"] = (trained.adapter, scale)
    out["vector"] = vector
    out["manifest"].update(user_id=user_id, level=config.level, adapter_scale=scale)
    return out


def _resolve_user(config, embed_dim: int, holds: str) -> tuple[str, np.ndarray]:
    """(user id, embedding (E,)) of the --config.user_id/level/user_embedding options."""
    from safealign_jax.psa_users import resolve_user_embedding

    try:
        return resolve_user_embedding(
            user_id=str(config.user_id), level=config.level, users=config.users, center_users=config.center_users,
            embeddings=config.embeddings, user_embedding=config.user_embedding, embed_dim=embed_dim)
    except UserError as error:
        raise UserError(f"--config.checkpoint={config.checkpoint} holds a {holds}: {error}") from None


def model_folder(config, run: dict) -> str:
    """--config.model, else the pipeline folder holding the checkpoint's base UNet."""
    if config.model:
        return resolve_model(config.model, "--config.model")
    from safealign_jax.train.samples import pipeline_folder

    folder = pipeline_folder(run.get("base_model", {}).get("path", ""))
    check(folder is not None, "--config.model is empty: give a diffusers pipeline folder.")
    return folder


def main(config, workdir):
    check(config.sampler in SAMPLER_NAMES, f"--config.sampler={config.sampler!r} is unknown (expected one of {', '.join(SAMPLER_NAMES)}).")
    check(config.steps >= 1, f"--config.steps={config.steps} must be >= 1.")
    check(config.batch_size >= 1, f"--config.batch_size={config.batch_size} must be >= 1.")
    check(config.dtype in ("float32", "bfloat16"), f"--config.dtype={config.dtype!r} must be float32 or bfloat16.")
    check(config.seeding in generation.SEEDINGS,
          f"--config.seeding={config.seeding!r} is unknown (expected one of {', '.join(generation.SEEDINGS)}).")
    rows = read_prompts(config.prompts)
    if config.limit:
        rows = rows[: config.limit]
    check(bool(rows), f"{config.prompts}: no prompts.")
    run = load_checkpoint(config)
    pipe = load_pipeline(model_folder(config, run), dtype=jnp.dtype(config.dtype), attention=config.attention)
    if "fold" in run:  # a user-gated PSA run: that user's deltas merged into the UNet once
        run["kwargs"]["unet_params"] = run["fold"](pipe.unet_params)
    if run:
        run["trained"].check_fits(pipe.unet_params, f"--config.checkpoint={config.checkpoint}")
        from safealign_jax.models.load import component_folder
        from safealign_jax.train.checkpoint import hash_folder

        unet_dir = component_folder(model_folder(config, run), "unet")
        if hash_folder(unet_dir) != run["base_model"].get("sha256"):
            print(f"warning: {config.checkpoint} was trained on {run['base_model'].get('path')!r}, "
                  f"not on {unet_dir}", file=sys.stderr)
    cli.output_folder(workdir)
    settings = {k: config[k] for k in ("steps", "sampler", "guidance", "guidance_rescale", "negative_prompt", "height", "width",
                                       "seeding")}
    settings.update(run.get("manifest", {}))
    todo = [r for r in rows if not os.path.exists(os.path.join(workdir, image_name(r)))]
    print(f"{len(rows) - len(todo)} of {len(rows)} images already present in {workdir}")
    with open(os.path.join(workdir, "manifest.jsonl"), "a") as manifest, tqdm(total=len(todo), unit="img") as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start: start + config.batch_size]
            seeds = [generation.image_seed(r, config.seed, config.use_file_seeds, config.seeding) for r in batch]
            extra = dict(run.get("kwargs", {}))
            if "vector" in run:
                extra["user_embeddings"] = np.tile(run["vector"][None], (len(batch), 1))
            images = generate(
                pipe, [r.prompt for r in batch], seeds,
                negative_prompts=[config.negative_prompt] * len(batch),
                num_steps=config.steps, guidance=config.guidance, sampler=config.sampler,
                guidance_rescale=config.guidance_rescale,
                height=config.height or None, width=config.width or None, **extra,
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
