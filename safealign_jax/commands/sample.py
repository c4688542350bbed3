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

Installed as `safealign-sample` (scripts/sample.py in the checkout).
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image

from safealign_jax import cli
from safealign_jax.errors import UserError, check
from safealign_jax.eval import generation
from safealign_jax.images import contact_sheet, save_png
from safealign_jax.models.load import component_folder
from safealign_jax.models.resolve import resolve_model
from safealign_jax.pipeline import load_pipeline
from safealign_jax.psa_users import resolve_user_embedding
from safealign_jax.runs import hash_folder, pipeline_folder
from safealign_jax.schedulers import SAMPLER_NAMES
from safealign_jax.trained import load_trained

SETTINGS = ("steps", "guidance", "guidance_rescale", "sampler", "seed", "use_file_seeds", "negative_prompt",
            "height", "width", "batch_size", "seeding")  # config fields = GenerationSettings fields
RECORDED = ("steps", "sampler", "guidance", "guidance_rescale", "negative_prompt", "seeding")


def resolve_user(config, trained) -> tuple[str | None, np.ndarray | None]:
    """(user id, embedding (E,)) of the --config.user_id/level/user_embedding options; (None, None)
    when the run needs no user."""
    user_options = config.user_id or config.user_embedding or config.level >= 0
    width = generation.user_width(trained) if trained is not None else None
    if width is None:
        check(not user_options, "--config.user_id/level/user_embedding need a PSA --config.checkpoint."
              if trained is None else f"--config.checkpoint={config.checkpoint} has no PSA adapter, "
              "so --config.user_id/level/user_embedding do not apply.")
        return None, None
    try:
        return resolve_user_embedding(
            user_id=str(config.user_id), level=config.level, users=config.users, center_users=config.center_users,
            embeddings=config.embeddings, user_embedding=config.user_embedding, embed_dim=width)
    except UserError as error:
        holds = "user-gated PSA run" if trained.gated is not None else "PSA adapter"
        raise UserError(f"--config.checkpoint={config.checkpoint} holds a {holds}: {error}") from None


def model_folder(config, trained) -> str:
    """--config.model, else the pipeline folder holding the checkpoint's base UNet."""
    if config.model:
        return resolve_model(config.model, "--config.model")
    folder = pipeline_folder(trained.base_model.get("path", "")) if trained is not None else None
    check(folder is not None, "--config.model is empty: give a diffusers pipeline folder.")
    return folder


def warn_if_other_base(config, trained, folder: str) -> None:
    unet_dir = component_folder(folder, "unet")
    if hash_folder(unet_dir) != trained.base_model.get("sha256"):
        print(f"warning: {config.checkpoint} was trained on {trained.base_model.get('path')!r}, not on {unet_dir}",
              file=sys.stderr)


def run(config, workdir):
    check(config.sampler in SAMPLER_NAMES, f"--config.sampler={config.sampler!r} is unknown (expected one of {', '.join(SAMPLER_NAMES)}).")
    check(config.steps >= 1, f"--config.steps={config.steps} must be >= 1.")
    check(config.batch_size >= 1, f"--config.batch_size={config.batch_size} must be >= 1.")
    check(config.dtype in ("float32", "bfloat16"), f"--config.dtype={config.dtype!r} must be float32 or bfloat16.")
    check(config.seeding in generation.SEEDINGS,
          f"--config.seeding={config.seeding!r} is unknown (expected one of {', '.join(generation.SEEDINGS)}).")
    check(bool(config.prompts), "--config.prompts is empty: give a .txt or .csv prompt file.")
    rows = generation.read_prompts(config.prompts)[: config.limit or None]
    check(bool(rows), f"{config.prompts}: no prompts.")
    step = config.checkpoint_step if config.checkpoint_step >= 0 else None
    trained = load_trained(config.checkpoint, step) if config.checkpoint else None
    user_id, vector = resolve_user(config, trained)
    folder = model_folder(config, trained)
    pipe = load_pipeline(folder, dtype=jnp.dtype(config.dtype), attention=config.attention)
    description = generation.describe_model(folder, config.checkpoint, step, config.dtype)
    record = {k: config[k] for k in RECORDED}
    if trained is None:
        model = generation.Model(pipe, description=description)
    else:
        scale = config.adapter_scale if config.adapter_scale >= 0 else None
        model = generation.apply_trained(pipe, trained, {**description, "user": user_id, "adapter_scale": scale},
                                         f"--config.checkpoint={config.checkpoint}", vector, scale)
        warn_if_other_base(config, trained, folder)  # after the shape check, which names the problem
        record.update(checkpoint=config.checkpoint, checkpoint_step=trained.step)
        if user_id is not None:
            record.update(user_id=user_id, level=config.level)
        if model.adapter is not None:
            record["adapter_scale"] = model.adapter[1]
        if trained.gated is not None:
            record["categories"] = list(trained.categories)
    cli.output_folder(workdir)
    todo = generation.missing_rows(rows, workdir, image_folder="")
    print(f"{len(rows) - len(todo)} of {len(rows)} images already present in {workdir}")
    settings = generation.GenerationSettings(**{k: config[k] for k in SETTINGS})
    generation.generate_run(model, rows, workdir, settings, [user_id] * len(rows), image_folder="", record=record)
    shown = [np.asarray(Image.open(os.path.join(workdir, generation.image_name(r))).convert("RGB"))
             for r in rows[: config.contact_sheet_max]]
    save_png(contact_sheet(shown), os.path.join(workdir, "contact_sheet.png"))
    print(f"wrote {len(todo)} images, manifest.jsonl and contact_sheet.png to {workdir}")


def main() -> None:
    cli.main(run)
