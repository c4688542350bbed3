"""Generating the images of one benchmark run: a prompt set x a model, resumable.

    model = load_model("sd15_pipeline", checkpoint="runs/safetydpo")      # LoRA / delta / PSA adapter
    rows = read_prompt_set("i2p", "../shared/data/eval_prompts")
    users = row_users(rows, level=3)                                      # PSA; None for SafetyDPO
    generate_run(model, rows, "eval/safetydpo/i2p", GenerationSettings(), users, embeddings="emb/")

A run folder holds `images/<name>.png` (one per prompt row, named by `image_name`; scripts/sample.py
puts them in the folder itself), `manifest.jsonl` (one record per generated image: file, row, id,
prompt, seed, category, categories, user, height, width) and `run.json` (model and settings). Images
already present are skipped, so an interrupted run goes on where it stopped; a run folder made with
other settings is refused rather than mixed. Each PNG carries its prompt, negative prompt, seed,
steps, guidance, sampler, size and model as text chunks, and the same as an A1111-style
"parameters" chunk (`png_text`), which A1111 / ComfyUI / civitai read.

Seeds (`seeding`, `image_seed`): "per_prompt" (default): a row's own seed (a CSV's sd_seed column,
I2P's) when `use_file_seeds`, else `seed + row index`. "single_stream": SafetyDPO's inference
protocol, which seeds ONE torch generator with 0 and consumes it prompt after prompt: here draw i
of one JAX stream seeded with `seed` (file seeds ignored), i = the row's index in the prompt file.
JAX's PRNG is not torch's, so no image is bit-identical to theirs in either mode: what reproduces
is the protocol (which prompts share a stream, which seed they start from), not the noise. Every
image's noise comes from its seed alone (pipeline.generate), so batching does not change images.
The last batch is padded to the batch size (one compile per run; `pipeline.generate` shards a
batch over the local devices when the batch size divides by their number).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from safealign_jax.data.eval_prompts import PromptRow, read_prompt_csv
from safealign_jax.data.tables import read_csv
from safealign_jax.data.users import format_user_id
from safealign_jax.errors import UserError, check
from safealign_jax.images import save_png
from safealign_jax.pipeline import Pipeline, generate, load_pipeline
from safealign_jax.psa_users import level_user_ids, load_embedding
from safealign_jax.schedulers import SAMPLER_NAMES, pipeline_sampler
from safealign_jax.trained import Trained, load_trained
from safealign_jax.user_embedding import embedding_path

SEEDINGS = ("per_prompt", "single_stream")
SEED_COLUMN = "sd_seed"  # a prompt CSV's per-row seeds (I2P's column)
# The negative prompt of the official PSA sampling (its base-model runs use none).
PSA_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
# Our sampler names -> the names A1111 writes in its "parameters" text (PNDM is its PLMS).
A1111_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_ancestral": "Euler a",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras"}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The papers' protocol: 50 steps, guidance 7.5, fixed per-prompt seeds."""

    steps: int = 50
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str = "ddim"
    seed: int = 0
    use_file_seeds: bool = True
    negative_prompt: str = ""
    height: int = 0  # 0: the model's native size
    width: int = 0
    batch_size: int = 4
    seeding: str = "per_prompt"  # or "single_stream" (SafetyDPO's inference); see `image_seed`

    def validate(self) -> None:
        check(self.seeding in SEEDINGS, f"seeding {self.seeding!r} is unknown (expected one of {', '.join(SEEDINGS)}).")
        check(self.sampler in SAMPLER_NAMES, f"sampler {self.sampler!r} is unknown (expected one of {', '.join(SAMPLER_NAMES)}).")
        check(self.steps >= 1, f"steps={self.steps} must be >= 1.")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1.")


@dataclasses.dataclass
class Model:
    """A base pipeline plus what a checkpoint adds: folded LoRA/delta params and a PSA adapter
    (with `user_embedding` (E,), the one user of every image; else each row's user)."""

    pipe: Pipeline
    unet_params: dict | None = None
    adapter: tuple[dict, float] | None = None
    description: dict = dataclasses.field(default_factory=dict)
    user_embedding: np.ndarray | None = None


def describe_model(pipeline: str, checkpoint: str = "", step: int | None = None, dtype: str = "float32") -> dict:
    """What identifies a model in `run.json` (paths as given made absolute; step None = latest)."""
    return {
        "pipeline": os.path.abspath(pipeline), "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "step": step, "dtype": dtype,
    }


def load_model(pipeline: str, checkpoint: str = "", step: int | None = None, dtype: str = "float32",
               attention: str = "auto") -> Model:
    """The base pipeline folder with an optional training / merge workdir (`trained.load_trained`):
    a LoRA or full delta is folded into the UNet; a PSA adapter is kept for per-image users.
    `attention`: the UNet's attention implementation (`models.attention.IMPLEMENTATIONS`)."""
    check(dtype in ("float32", "bfloat16"), f"dtype {dtype!r} must be float32 or bfloat16.")
    description = describe_model(pipeline, checkpoint, step, dtype)
    if checkpoint:
        check(os.path.isdir(checkpoint), f"{checkpoint}: no such checkpoint folder (a training or merge workdir).")
    pipe = load_pipeline(pipeline, dtype=jnp.dtype(dtype), attention=attention)
    if not checkpoint:
        return Model(pipe=pipe, description=description)
    return apply_trained(pipe, load_trained(checkpoint, step), description, checkpoint)


def user_width(trained: Trained) -> int | None:
    """The width E of the user embedding a run needs (PSA adapter, user-gated run); None: no user."""
    return trained.trainable.user_width


def apply_trained(pipe: Pipeline, trained: Trained, description: dict, where: str,
                  user_embedding: np.ndarray | None = None, adapter_scale: float | None = None) -> Model:
    """`pipe` with what `trained` adds: its LoRA or delta folded into the UNet; a user-gated run
    folded for `user_embedding` (E,); a PSA adapter at `adapter_scale` (None: the run's psa.scale),
    with `user_embedding` as every image's user when given. `where` names the run in errors."""
    run = trained.trainable
    check("gated" not in run.tree or user_embedding is not None,
          f"{where} is a user-gated PSA run: give the user to fold it for.")
    foldable = set(run.tree) - {"adapter"}
    unet_params = run.folded(pipe.unet_params, user_embedding, where, trained.hard_gates) if foldable else None
    if "adapter" not in run.tree:
        return Model(pipe, unet_params, description=description)
    scale = run.scale("adapter") if adapter_scale is None else adapter_scale
    return Model(pipe, unet_params, (run.tree["adapter"], scale), description, user_embedding)


def read_prompts(path: str) -> list[PromptRow]:
    """Prompt rows from a .csv (prompt/caption column; a user_id column gives each row its PSA
    user) or a .txt file (one prompt per line)."""
    check(bool(path), "the prompt file name is empty: give a .txt or .csv prompt file.")
    check(os.path.isfile(path), f"{path}: no such prompt file.")
    if path.endswith(".csv"):
        columns, _ = read_csv(path)
        return read_prompt_csv(path, user_column="user_id" if "user_id" in columns else None,
                               seed_column=SEED_COLUMN if SEED_COLUMN in columns else None)
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return [PromptRow(index=i, id=str(i), prompt=p) for i, p in enumerate(lines) if p.strip()]


def image_name(row: PromptRow) -> str:
    """`00012.png`, or `00012_<file_name stem>.png` when the prompt file names its images."""
    stem = os.path.splitext(row.id)[0]
    if stem == str(row.index):
        return f"{row.index:05d}.png"
    return f"{row.index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:80]}.png"


def image_seed(row: PromptRow, seed: int, use_file_seeds: bool, seeding: str = "per_prompt") -> int:
    """The seed of `row`'s image (see the module docstring). per_prompt: the row's file seed when
    `use_file_seeds` and it has one, else `seed + row.index`; single_stream: draw `row.index` of
    the stream seeded with `seed`, an integer in [0, 2**31 - 1)."""
    if seeding == "single_stream":
        draw = jax.random.fold_in(jax.random.key(seed), row.index)
        return int(jax.random.randint(draw, (), 0, 2**31 - 1))
    check(seeding == "per_prompt", f"seeding {seeding!r} is unknown (expected one of {', '.join(SEEDINGS)}).")
    return row.seed if use_file_seeds and row.seed is not None else seed + row.index


def row_users(rows: Sequence[PromptRow], user_id: str = "", level: int = -1,
              center_users: str = "") -> list[str | None]:
    """The user of each row: `user_id` for all rows, else PSA level `level`'s user for all rows
    (`psa_users.level_user_ids(center_users)`: the official evaluation's table, or the levels of
    a named center_users.csv), else the row's own user (Sage prompt sets), else None."""
    check(not (user_id and level >= 0), f"give a user id ({user_id!r}) or a level ({level}), not both.")
    if user_id:
        fixed = format_user_id(user_id, "user_id")
    elif level >= 0:
        ids, _ = level_user_ids(center_users)
        check(level < len(ids), f"PSA level {level} is not in 0..{len(ids) - 1}.")
        fixed = ids[level]
    else:
        return [row.user_id for row in rows]
    return [fixed] * len(rows)


def _embeddings(users: Sequence[str | None], folder: str, embed_dim: int, cache: dict) -> np.ndarray:
    """(B, E) embeddings of `users` from `folder/{user_id}.npy`."""
    check(bool(folder), "the model has a PSA adapter: set the folder of user embeddings ({user_id}.npy).")
    for user in users:
        if user is None:
            raise UserError("the model has a PSA adapter but a prompt has no user; set a user id or a level.")
        if user not in cache:
            cache[user] = load_embedding(embedding_path(folder, user), embed_dim)
    return np.stack([cache[u] for u in users])


def model_name(description: dict) -> str:
    """"<pipeline folder name>" or "<pipeline folder name> + <checkpoint folder name>"."""
    name = os.path.basename(os.path.normpath(description["pipeline"]))
    checkpoint = description.get("checkpoint")
    return f"{name} + {os.path.basename(os.path.normpath(checkpoint))}" if checkpoint else name


def png_text(prompt: str, seed: int, settings: GenerationSettings, sampler: str, model: str,
             height: int, width: int) -> dict[str, str]:
    """An image's PNG text chunks: prompt, negative_prompt, seed, steps, guidance, sampler, size,
    model, and "parameters" as A1111 writes it (prompt / "Negative prompt: ..." / "Steps: 50,
    Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15"). `sampler`: the resolved
    name (not "pipeline")."""
    negative = f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else ""
    parameters = (f"{prompt}{negative}\nSteps: {settings.steps}, Sampler: {A1111_SAMPLERS.get(sampler, sampler)}, "
                  f"CFG scale: {settings.guidance:g}, Seed: {seed}, Size: {width}x{height}, Model: {model}")
    return {"prompt": prompt, "negative_prompt": settings.negative_prompt, "seed": str(seed),
            "steps": str(settings.steps), "guidance": f"{settings.guidance:g}", "sampler": sampler,
            "size": f"{width}x{height}", "model": model, "parameters": parameters}


def missing_rows(rows: Sequence[PromptRow], folder: str, image_folder: str = "images") -> list[PromptRow]:
    """The rows whose image is not yet in `folder/image_folder`."""
    return [r for r in rows if not _has_image(r, folder, image_folder)]


def _has_image(row: PromptRow, folder: str, image_folder: str) -> bool:
    return os.path.exists(os.path.join(folder, image_folder, image_name(row)))


def run_record(description: dict, settings: GenerationSettings, embeddings: str = "") -> dict:
    """The content of a run folder's run.json."""
    return json.loads(json.dumps({"model": description, "settings": dataclasses.asdict(settings), "embeddings": embeddings}))


def check_run(folder: str, run: dict) -> None:
    """Writes `folder/run.json`, or raises UserError if the folder holds a run of other settings."""
    path = os.path.join(folder, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != run:
            changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
            raise UserError(f"{folder}: holds images made with other {', '.join(changed)}; use another folder.")
    else:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(run, f, indent=1)


def generate_run(
    model: Model,
    rows: Sequence[PromptRow],
    folder: str,
    settings: GenerationSettings,
    users: Sequence[str | None] | None = None,
    embeddings: str = "",
    progress: bool = True,
    *,
    image_folder: str = "images",
    record: dict | None = None,
) -> int:
    """Writes the missing images of `rows` into `folder/image_folder` (see the module docstring);
    returns how many were generated. `users`: one user id (or None) per row; with a PSA adapter
    each row's embedding is `embeddings/{user}.npy`, unless `model.user_embedding` is set.
    `record`: fields added to (or replacing) every manifest record's."""
    settings.validate()
    users = list(users) if users is not None else [None] * len(rows)
    check(len(users) == len(rows), f"got {len(users)} users for {len(rows)} prompts.")
    check_run(folder, run_record(model.description, settings, embeddings))
    images_dir = os.path.join(folder, image_folder)
    os.makedirs(images_dir, exist_ok=True)
    todo = [(r, u) for r, u in zip(rows, users, strict=True) if not _has_image(r, folder, image_folder)]
    sampler = pipeline_sampler(model.pipe.scheduler) if settings.sampler == "pipeline" else settings.sampler
    name = model_name(model.description)
    cache: dict = {}
    size = settings.batch_size
    with open(os.path.join(folder, "manifest.jsonl"), "a", encoding="utf-8") as manifest, \
            tqdm(total=len(todo), unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), size):
            batch = todo[start: start + size]
            padded = batch + [batch[-1]] * (size - len(batch))
            seeds = [image_seed(r, settings.seed, settings.use_file_seeds, settings.seeding) for r, _ in padded]
            extra = {}
            if model.adapter is not None and model.user_embedding is not None:
                extra = {"adapter": model.adapter, "user_embeddings": np.tile(model.user_embedding[None], (size, 1))}
            elif model.adapter is not None:
                extra = {"adapter": model.adapter, "user_embeddings": _embeddings(
                    [u for _, u in padded], embeddings, model.adapter[0]["proj"]["kernel"].shape[0], cache)}
            images = generate(
                model.pipe, [r.prompt for r, _ in padded], seeds,
                negative_prompts=[settings.negative_prompt] * size,
                num_steps=settings.steps, guidance=settings.guidance, sampler=settings.sampler,
                guidance_rescale=settings.guidance_rescale,
                height=settings.height or None, width=settings.width or None,
                unet_params=model.unet_params, **extra,
            )
            height, width = images.shape[1:3]
            for (row, user), seed, image in zip(batch, seeds, images, strict=False):
                text = png_text(row.prompt, seed, settings, sampler, name, height, width)
                save_png(image, os.path.join(images_dir, image_name(row)), text)
                manifest.write(json.dumps({
                    "file": image_name(row), "row": row.index, "id": row.id, "prompt": row.prompt,
                    "seed": seed, "category": row.category, "categories": list(row.categories),
                    "user": user, "height": int(height), "width": int(width), **(record or {}),
                }) + "\n")
            manifest.flush()
            bar.update(len(batch))
    return len(todo)


def read_manifest(folder: str) -> list[dict]:
    """The run's records in row order (the last record of a file wins)."""
    path = os.path.join(folder, "manifest.jsonl")
    check(os.path.isfile(path), f"{folder}: no manifest.jsonl (generate the run first).")
    records = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise UserError(f"{path}:{number}: not a JSON record ({error}).") from error
                records[record["file"]] = record
    return sorted(records.values(), key=lambda r: r["row"])


def load_images(folder: str, records: Sequence[dict]) -> np.ndarray:
    """(B, H, W, 3) uint8 images of `records` from the run folder."""
    return np.stack([
        np.asarray(Image.open(os.path.join(folder, "images", r["file"])).convert("RGB")) for r in records
    ])
