"""The loss the trainer differentiates: Diffusion-DPO of the base UNet plus the trainable tree
({"lora"}, {"adapter"} or both, see `safealign_jax.trained`), w.r.t. that tree only, with the
model's DDPM training schedule. The reference is the frozen base (no LoRA, no adapter).

PSA: the policy's user tokens are `adapter.user_tokens(tree, batch["user_embedding"])`, the
embeddings (B, E) float32; the adapter's lambda is folded into its to_v_ip. User-gated PSA
({"gated"}, `safealign_jax.gated`): the policy's "lora" collection is `gated.variables(tree,
batch["user_embedding"])`, per-example gates; with frozen experts the factors are behind a
stop_gradient (and get no updates, `gated.freeze_experts`). Caption dropout
(`step.drop_captions`) replaces the text states only: the PSA paper (arXiv 2508.01151) does not
say the user is dropped too, so every pair keeps its user's embedding.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax import dpo, gated
from safealign_jax.errors import UserError
from safealign_jax.runs import folder_holding
from safealign_jax.schedulers import DDPMSchedule, ddpm_schedule, scheduler_config_from_dict
from safealign_jax.trainable import Trainable

# Stable Diffusion's training schedule, used when the model folder has no scheduler config.
SD_SCHEDULE = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def training_schedule(model_path: str, prediction_type: str) -> DDPMSchedule:
    """The DDPM schedule of the pipeline holding `model_path` (a pipeline or its unet/ folder),
    else SD's with `prediction_type`."""
    folder = folder_holding(model_path, os.path.join("scheduler", "scheduler_config.json"))
    if folder is not None:
        return ddpm_schedule(folder)
    return ddpm_schedule(scheduler_config_from_dict(
        dict(SD_SCHEDULE, prediction_type=prediction_type), "built-in SD schedule"))


def _user_embeddings(batch: dict, width: int) -> jax.Array:
    """batch["user_embedding"] (B, `width`) as float32, or a UserError."""
    if "user_embedding" not in batch:
        raise UserError("PSA training: the batch source yields no 'user_embedding' (B, E) entry.")
    embeddings = batch["user_embedding"]
    if embeddings.ndim != 2 or embeddings.shape[1] != width:
        raise UserError(f"PSA training: user_embedding has shape {tuple(embeddings.shape)}, "
                        f"expected (B, {width}) (--config.psa.embed_dim).")
    return jnp.asarray(embeddings, jnp.float32)


def policy_collections(trainable: dict, batch: dict, lora_scale: float,
                       adapter_scale: float, train_gated_experts: bool = True) -> tuple[dict, dict]:
    """(extra UNet collections of the policy, batch with "user_tokens" (B, N, D) in place of
    "user_embedding" (B, E)) for `trainable` = {"lora"?, "adapter"?} or {"gated"}
    (`Trainable.collections` / `user_tokens`)."""
    if "gated" in trainable and not train_gated_experts:
        tree = trainable["gated"]
        trainable = {**trainable, "gated": {**tree, "experts": jax.lax.stop_gradient(tree["experts"])}}
    run = Trainable(trainable, {"lora": lora_scale, "adapter": adapter_scale})
    width = run.user_width
    embeddings = None if width is None else _user_embeddings(batch, width)
    collections = run.collections(embeddings)
    if embeddings is not None:
        batch = {k: v for k, v in batch.items() if k != "user_embedding"}
        if "adapter" in trainable:
            batch["user_tokens"] = run.user_tokens(embeddings)
    return collections, batch


def make_loss_fn(module, lora_scale: float, schedule: DDPMSchedule, beta: float,
                 adapter_scale: float = 1.0, train_gated_experts: bool = True,
                 options: dpo.DPOOptions | None = None, kind: str = "dpo", route_gates: bool = False):
    """loss_fn(trainable, params, batch, key) -> (loss, metrics) for `step.make_train_step`;
    `trainable` = {"lora": LoRA tree} and/or {"adapter": PSA tree}, or {"gated": gated PSA tree}
    (see `safealign_jax.trained`). `kind`: "dpo" (`dpo.diffusion_dpo_loss` with `options`) or
    "sft" (`dpo.diffusion_sft_loss`, the SFT baseline; only the noise options apply); options
    None = the paper's loss. `route_gates`: a gated tree's row b uses only the gate of its pair's
    category, batch["category_index"] (B,) int (`gated.route`); the entry is ignored otherwise."""
    options = options or dpo.DPOOptions()

    def loss_fn(trainable, params, batch, key):
        categories = batch.get("category_index")
        batch = {k: v for k, v in batch.items() if k != "category_index"}
        collections, batch = policy_collections(trainable, batch, lora_scale, adapter_scale,
                                                train_gated_experts)
        if route_gates and "gated" in trainable:
            if categories is None:
                raise UserError("--config.psa.gated.route=True: the batch source yields no 'category_index' "
                                "(B,) entry (the gated category of each pair).")
            collections["lora"] = gated.route(collections["lora"], categories)
        if kind == "sft":
            return dpo.diffusion_sft_loss(module.apply, params, collections, batch, schedule, key, options)
        return dpo.diffusion_dpo_loss(module.apply, params, collections, batch, schedule, key, beta, options)

    return loss_fn


OBJECTIVES = ("dpo", "sft")


def options_from_config(config) -> dpo.DPOOptions:
    """`dpo.DPOOptions` of `config.dpo`, or a one-line UserError naming the bad field."""
    d = config.dpo
    for field, ok, expected in (
        ("objective", d.objective in OBJECTIVES, f"one of {list(OBJECTIVES)}"),
        ("sft_weight", d.sft_weight >= 0, "a number >= 0 (0 disables)"),
        ("preserve_weight", d.preserve_weight >= 0, "a number >= 0 (0 disables)"),
        ("sdpo_mu", 0 <= d.sdpo_mu < 1, "a number in [0, 1)"),
        ("noise_offset", d.noise_offset >= 0, "a number >= 0 (0 disables)"),
        ("input_perturbation", d.input_perturbation >= 0, "a number >= 0 (0 disables)"),
        ("retain_prompts", bool(d.retain_prompts) or not d.preserve_weight,
         "a prompt file (.txt, one per line, or .csv with a 'prompt' column) with dpo.preserve_weight > 0"),
    ):
        if not ok:
            raise UserError(f"--config.dpo.{field}={d[field]!r} is invalid (expected {expected}).")
    if d.objective == "sft" and (d.sft_weight or d.preserve_weight or d.sdpo):
        raise UserError("--config.dpo.objective='sft' takes no dpo.sft_weight / dpo.preserve_weight / dpo.sdpo "
                        "(they are terms of the DPO objective).")
    return dpo.DPOOptions(sft_weight=float(d.sft_weight), preserve_weight=float(d.preserve_weight),
                          sdpo=bool(d.sdpo), sdpo_mu=float(d.sdpo_mu), noise_offset=float(d.noise_offset),
                          input_perturbation=float(d.input_perturbation))


def read_retain_prompts(path: str) -> list[str]:
    """The prompts of a retain-prompt file: a .csv with a `prompt` column, else one prompt per
    line (blank lines skipped)."""
    import csv

    if not os.path.isfile(path):
        raise UserError(f"--config.dpo.retain_prompts={path!r}: no such file.")
    with open(path, newline="", encoding="utf-8") as f:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(f)
            if "prompt" not in (reader.fieldnames or ()):
                raise UserError(f"--config.dpo.retain_prompts={path!r}: the CSV has no 'prompt' column "
                                f"(columns: {reader.fieldnames}).")
            prompts = [row["prompt"].strip() for row in reader]
        else:
            prompts = [line.strip() for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"--config.dpo.retain_prompts={path!r}: the file holds no prompts.")
    return prompts


RETAIN_STREAM = 0x7E7A1  # separates the retain-prompt draw from other host random streams


class RetainPrompts:
    """The retain prompts of the preservation term, encoded once: states (R, S, D) float32 and,
    for SDXL, pooled (R, P) float32 (else None)."""

    def __init__(self, states: np.ndarray, pooled: np.ndarray | None):
        self.states, self.pooled = states, pooled

    @classmethod
    def encode(cls, model_path: str, prompts: list[str], chunk: int = 64) -> "RetainPrompts":
        """Encodes `prompts` with the text encoder(s) of the pipeline folder holding `model_path`
        (as the latent cache encodes its captions: `data.cache.load_encoders` / `encode_texts`)."""
        from safealign_jax.data.cache import encode_texts, load_encoders
        from safealign_jax.runs import pipeline_folder

        folder = pipeline_folder(model_path)
        if folder is None:
            raise UserError(f"--config.dpo.preserve_weight > 0 encodes dpo.retain_prompts with the pipeline's "
                            f"text encoders: --config.model.path={model_path!r} is not in a diffusers pipeline "
                            f"folder (model_index.json).")
        pipe = load_encoders(folder)
        parts = [encode_texts(pipe, prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)]
        pooled = None if parts[0][1] is None else np.concatenate([p for _, p in parts])
        return cls(np.concatenate([s for s, _ in parts]), pooled)

    def draw(self, seed: int, step: int, rows: slice, global_rows: int) -> dict:
        """This process's `rows` of one retain prompt per pair for global step `step` (0-based):
        {"retain_hidden_states": (rows, S, D)[, "retain_text_embeds": (rows, P)]}. The draw
        depends only on (seed, step), so every process, device layout and resumed run agrees."""
        index = np.random.default_rng([seed, step, RETAIN_STREAM]).integers(0, len(self.states), global_rows)
        index = index[rows]
        out = {"retain_hidden_states": self.states[index]}
        if self.pooled is not None:
            out["retain_text_embeds"] = self.pooled[index]
        return out
