"""Periodic sample grids during training: the current LoRA rendered for fixed prompts and seeds.

With `train.sample_every > 0` and a base model inside a diffusers pipeline folder, every
`sample_every` steps process 0 writes workdir/samples/step_XXXXXX.png: one image per prompt of
`train.sample_prompts` ("|"-separated), seeds 0..n-1, so grids of different steps compare.
"""

import os

import jax

from safealign_jax.errors import UserError
from safealign_jax.images import contact_sheet, save_png, to_uint8
from safealign_jax.pipeline import generate, load_pipeline
from safealign_jax.runs import pipeline_folder
from safealign_jax.trainable import Trainable


class SampleGrids:
    """Renders and saves the grids; a no-op when disabled or off process 0."""

    def __init__(self, config, module, params, workdir: str):
        t = config.train
        self.every = t.sample_every
        self.prompts = [p.strip() for p in t.sample_prompts.split("|") if p.strip()]
        self.steps, self.guidance = t.sample_steps, t.sample_guidance
        self.folder = os.path.join(workdir, "samples")
        self.pipe = None
        if self.every <= 0 or jax.process_index() != 0:
            return
        if jax.process_count() > 1:
            raise UserError("--config.train.sample_every > 0 is single-process only; set it to 0 for multi-host runs.")
        folder = pipeline_folder(config.model.path)
        if folder is None:
            raise UserError(
                f"--config.train.sample_every={self.every} needs --config.model.path inside a diffusers "
                f"pipeline folder (model_index.json); got {config.model.path!r}."
            )
        if not self.prompts:
            raise UserError("--config.train.sample_prompts is empty ('|'-separated prompts expected).")
        self.pipe = load_pipeline(folder, dtype=module.dtype, unet=(module, params))
        os.makedirs(self.folder, exist_ok=True)

    def maybe_save(self, step: int, params, trainable: dict, scale: float, last: bool) -> None:
        """Writes the grid of `step` when it is a sampling step (or the last one)."""
        if self.pipe is None or not (step % self.every == 0 or last):
            return
        images = generate(
            self.pipe, self.prompts, list(range(len(self.prompts))), num_steps=self.steps,
            guidance=self.guidance, unet_params=params, lora=Trainable({"lora": trainable["lora"]}, {"lora": scale}).collections()["lora"],
        )
        save_png(contact_sheet([to_uint8(i) for i in images]), os.path.join(self.folder, f"step_{step:06d}.png"))
