"""The Diffusion-DPO loss (and the SFT baseline) as pure functions, with optional extra terms.

For a pair (prompt c, preferred latents x_w, rejected latents x_l), one noise eps and one
timestep t are drawn and shared by both images; m(x) is the per-image mean squared error of the
UNet prediction against the target (eps, or v for v-prediction models), for the trained policy
(theta) and the frozen reference (ref), and

    d    = (m_theta(x_w) - m_theta(x_l)) - (m_ref(x_w) - m_ref(x_l))
    loss = mean over pairs of -log sigmoid(-(beta / 2) d).

The reference is the base UNet with the trainable collections ("lora", "adapter") left out, so
no second copy of the weights exists. `diffusion_dpo_loss` is the one definition of the loss the
trainer differentiates, w.r.t. the trainable tree only:

    def loss_fn(lora_tree):
        collections = Trainable({"lora": lora_tree}, {"lora": cfg.scale}).collections()
        return diffusion_dpo_loss(module.apply, params, collections, batch, schedule, key, beta)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora_tree)

`DPOOptions` adds, each off by default (the defaults are the paper's loss bit for bit):
  sft_weight w_s:       + w_s * mean_i m_theta(x_w,i), the plain denoising loss on the winners
                        (same noise and t as the pairs, no extra UNet call);
  preserve_weight w_p:  + w_p * mean_i mean((policy(x_t,w,i, c_r,i) - ref(x_t,w,i, c_r,i))^2),
                        the policy kept at the reference on retain prompts c_r (one per pair, in
                        batch["retain_hidden_states"]) at the pair's noised winner and t;
  sdpo:                 Diffusion-SDPO (arXiv 2511.03317) scales the loser's gradient by
                        `sdpo_loser_scale` so that the winner's error does not rise (first order,
                        output space);
  noise_offset, input_perturbation: the official training options (`pair_noise`).

Shapes: latents (B, H, W, C) NHWC; encoder_hidden_states (B, S, D); all losses float32.
"""

import dataclasses

import jax
import jax.numpy as jnp

from safealign_jax.errors import check
from safealign_jax.schedulers import DDPMSchedule, add_noise, target


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    """The terms and noise options beside the paper's Diffusion-DPO (see the module docstring).

    sft_weight, preserve_weight: weights (>= 0) of the SFT and preservation terms; 0 = off.
    sdpo: the Diffusion-SDPO safeguard; sdpo_mu in [0, 1) its margin mu (official launchers:
      0.9 for SD1.5, 0.6 for SDXL; 0 = the winner's error merely does not rise).
    noise_offset, input_perturbation: scales (>= 0) of `pair_noise`'s extra noise; 0 = off.
    """

    sft_weight: float = 0.0
    preserve_weight: float = 0.0
    sdpo: bool = False
    sdpo_mu: float = 0.9
    noise_offset: float = 0.0
    input_perturbation: float = 0.0


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of (pred - target)^2 over every axis but the first, in float32: (B, ...) -> (B,)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return err.mean(axis=tuple(range(1, err.ndim)))


def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x in the forward pass (bitwise), `scale` * its gradient in the backward pass."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + scale * (x - frozen)


def dpo_loss(
    mse_policy_w: jax.Array,
    mse_policy_l: jax.Array,
    mse_ref_w: jax.Array,
    mse_ref_l: jax.Array,
    beta: float,
    loser_scale: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """The Diffusion-DPO loss from per-pair errors (each (B,)).

    `loser_scale` (a scalar, e.g. `sdpo_loser_scale`): the gradient through mse_policy_l is
    multiplied by it; the loss value is unchanged. None = the paper's gradient.

    Returns:
      (loss, metrics), all scalars:
        loss: mean of -log sigmoid(-(beta/2) d) (computed as -log_sigmoid, stable for any d);
        implicit_accuracy: fraction of pairs whose implicit reward margin -(beta/2) d is > 0,
          a tie (margin exactly 0, e.g. the policy still equals the reference) counting 1/2;
        reward_margin: mean of -(beta/2) d;
        mse_w_diff, mse_l_diff: mean of m_theta - m_ref on winners / losers (whether the winner
          got better or only the loser worse);
        mse_policy_w, mse_policy_l, mse_ref_w, mse_ref_l: the raw mean errors.
    """
    mse = [x.astype(jnp.float32) for x in (mse_policy_w, mse_policy_l, mse_ref_w, mse_ref_l)]
    policy_w, policy_l, ref_w, ref_l = mse
    scaled_l = policy_l if loser_scale is None else scale_gradient(policy_l, loser_scale)
    d = (policy_w - scaled_l) - (ref_w - ref_l)
    margin = -(beta / 2) * d
    loss = -jax.nn.log_sigmoid(margin).mean()
    metrics = {
        "loss": loss,
        "implicit_accuracy": jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)).mean(),
        "reward_margin": margin.mean(),
        "mse_w_diff": (policy_w - ref_w).mean(),
        "mse_l_diff": (policy_l - ref_l).mean(),
        "mse_policy_w": policy_w.mean(),
        "mse_policy_l": policy_l.mean(),
        "mse_ref_w": ref_w.mean(),
        "mse_ref_l": ref_l.mean(),
    }
    return loss, metrics


def sdpo_loser_scale(residual_w: jax.Array, residual_l: jax.Array, mu: float) -> jax.Array:
    """Diffusion-SDPO's loser scale lambda from the policy's residuals (prediction - target) on
    the winners and the losers, each (B, H, W, C); a float32 scalar behind a stop_gradient.

    With g_w, g_l the gradients of the batch errors A = mean (r_w)^2, B = mean (r_l)^2 w.r.t.
    the predictions (output space, g = 2 r / numel), the update -(g_w - lambda g_l) changes A
    by -<g_w, g_w - lambda g_l> <= -mu <g_w, g_w> when

        lambda = clip((1 - mu) <g_w, g_w> / <g_l, g_w>, 0, 1)  if <g_l, g_w> > 0,  else 1.

    As published (official code): one lambda per batch, in output space, from the unweighted
    errors (not the DPO's per-pair sigmoid weights), without its 1e-9 in the denominator.
    """
    r_w, r_l = (jax.lax.stop_gradient(r.astype(jnp.float32)) for r in (residual_w, residual_l))
    winner = jnp.sum(r_w * r_w)
    aligned = jnp.sum(r_l * r_w)
    cap = (1.0 - mu) * winner / jnp.where(aligned > 0, aligned, 1.0)
    return jnp.clip(jnp.where(aligned > 0, cap, 1.0), 0.0, 1.0)


def preservation_loss(policy: jax.Array, reference: jax.Array) -> jax.Array:
    """mean_i mean((policy_i - reference_i)^2) in float32, the reference behind a stop_gradient:
    (B, ...) predictions -> scalar."""
    return per_example_mse(policy, jax.lax.stop_gradient(reference)).mean()


def sft_loss(mse_policy_w: jax.Array) -> tuple[jax.Array, dict]:
    """The SFT baseline: the plain denoising loss on the preferred images. (B,) -> (loss, metrics)."""
    loss = mse_policy_w.astype(jnp.float32).mean()
    return loss, {"loss": loss, "mse_policy_w": loss}


def _draw(key: jax.Array, shape: tuple[int, ...], num_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """eps ~ N(0, I) of `shape` (float32) and t ~ U{0..num_timesteps-1} of shape (shape[0],)."""
    key_noise, key_t = jax.random.split(key)
    noise = jax.random.normal(key_noise, shape, jnp.float32)
    return noise, jax.random.randint(key_t, (shape[0],), 0, num_timesteps)


def pair_noise(
    key: jax.Array,
    shape: tuple[int, ...],
    num_timesteps: int,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noise the input is noised with, noise of the target, t) for latents of `shape` (B, H, W, C).

    noise = eps + noise_offset * N(0, 1) of shape (B, 1, 1, C) (one offset per image and
    channel); the input is noised with noise + input_perturbation * N(0, I) while the target
    keeps `noise` (the official Diffusion-DPO / diffusers options). eps and t are `_draw(key)`'s,
    the extra noise comes from fold_in(key, 1), so both at 0 give the plain draw bit for bit.
    """
    noise, t = _draw(key, shape, num_timesteps)
    key_offset, key_perturbation = jax.random.split(jax.random.fold_in(key, 1))
    if noise_offset:
        noise = noise + noise_offset * jax.random.normal(key_offset, (shape[0], 1, 1, shape[-1]), jnp.float32)
    noised_with = noise
    if input_perturbation:
        noised_with = noise + input_perturbation * jax.random.normal(key_perturbation, shape, jnp.float32)
    return noised_with, noise, t


def _noised(
    key: jax.Array, latents: tuple[jax.Array, ...], schedule: DDPMSchedule, options: DPOOptions
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(model input, target, t) of the latents [x_1; ...; x_k] stacked (each (B, H, W, C), float32
    (kB, ...) outputs, t (kB,)): row b of every x_i noised with the same eps and t, drawn by
    `pair_noise` with the options' noise settings."""
    noised_with, noise, t = pair_noise(key, latents[0].shape, schedule.num_train_timesteps,
                                       options.noise_offset, options.input_perturbation)
    noised_with, noise, t = (jnp.concatenate([x] * len(latents)) for x in (noised_with, noise, t))
    x0 = jnp.concatenate(latents).astype(jnp.float32)
    return add_noise(schedule, x0, noised_with, t), target(schedule, x0, noise, t), t


def _twice(tree):
    """Each array of `tree` (batch first) concatenated with itself: (B, ...) -> (2B, ...)."""
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), tree)


def _append(pairs, retain):
    """Each array of `pairs` (2B, ...) followed by the matching one of `retain` (B, ...)."""
    return jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y.astype(x.dtype)]), pairs, retain)


def _retain_conditioning(batch: dict):
    """(text states, added_cond, user tokens) of the retain rows: the retain prompts' states
    (B, S, D) and pooled embeds (SDXL), the pair's time ids and user tokens."""
    check("retain_hidden_states" in batch,
          "dpo.preserve_weight > 0 needs batch['retain_hidden_states'] (B, S, D) (--config.dpo.retain_prompts).")
    states = batch["retain_hidden_states"]
    check(states.shape == batch["encoder_hidden_states"].shape,
          f"retain prompt states {tuple(states.shape)} must match the batch's text states "
          f"{tuple(batch['encoder_hidden_states'].shape)} (same text encoder and sequence length).")
    added = batch.get("added_cond")
    if added is not None:
        check("retain_text_embeds" in batch,
              "dpo.preserve_weight > 0 with an SDXL UNet needs batch['retain_text_embeds'] (B, P).")
        added = {**added, "text_embeds": batch["retain_text_embeds"]}
    return states, added, batch.get("user_tokens")


def diffusion_dpo_loss(
    apply_fn,
    params,
    trainable: dict,
    batch: dict,
    schedule: DDPMSchedule,
    key: jax.Array,
    beta: float,
    options: DPOOptions = DPOOptions(),
) -> tuple[jax.Array, dict]:
    """The Diffusion-DPO loss of one batch of pairs: policy = base + trainable, reference = base.

    Args:
      apply_fn: `module.apply` of the UNet, called as apply_fn(variables, sample, timesteps,
        encoder_hidden_states, added_cond, user_tokens) -> prediction shaped like sample.
      params: the frozen base params.
      trainable: the extra variable collections of the policy, e.g. {"lora": ...} or
        {"adapter": ...}; the reference runs on {"params": params} alone.
      batch: latents_w, latents_l (B, H, W, C); encoder_hidden_states (B, S, D); optional
        added_cond {"text_embeds", "time_ids"} (SDXL) and user_tokens (B, N, D) (PSA); with
        options.preserve_weight > 0 also retain_hidden_states (B, S, D) (and retain_text_embeds
        (B, P) for SDXL): one retain prompt per pair.
      schedule: the model's DDPM training schedule (its prediction_type sets the target);
        t ~ U{0..T-1}.
      key: PRNG key for the noise and timesteps (one eps and one t per pair, shared by w and l).
      beta: the DPO temperature (papers: 5000).
      options: the extra terms and noise options (default: none, the paper's loss).
    Returns:
      (loss, metrics): loss = dpo_loss + w_s * sft_loss + w_p * preserve_loss; metrics as
      `dpo_loss`'s plus dpo_loss, and sft_loss / preserve_loss / sdpo_lambda when that option
      is on. Both models run once each on the batch [w; l] of 2B ([w; l; w with the retain
      prompts] of 3B with the preservation term).
    """
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    check(
        x_w.shape == x_l.shape,
        f"batch latents_w {x_w.shape} and latents_l {x_l.shape} must have the same shape.",
    )
    pairs = 2 * x_w.shape[0]
    # the same noise and timestep for x_w (first half) and x_l (second half)
    sample, goal, t = _noised(key, (x_w, x_l), schedule, options)
    conditioning = (
        t,
        _twice(batch["encoder_hidden_states"]),
        _twice(batch.get("added_cond")),
        _twice(batch.get("user_tokens")),
    )
    if options.preserve_weight:  # the noised winners and their t again, with the retain prompts
        retain = _retain_conditioning(batch)
        sample = jnp.concatenate([sample, sample[: pairs // 2]])
        conditioning = _append(conditioning, (t[: pairs // 2], *retain))
    policy = apply_fn({"params": params, **trainable}, sample, *conditioning)
    reference = jax.lax.stop_gradient(apply_fn({"params": params}, sample, *conditioning))
    if options.preserve_weight:
        (policy, policy_retain), (reference, reference_retain) = (
            (x[:pairs], x[pairs:]) for x in (policy, reference))
    # One reduction for all four errors, so that equal predictions give bitwise equal errors
    # (separately compiled reductions may round differently, which beta = 5000 would amplify).
    mse = per_example_mse(jnp.concatenate([policy, reference]), _twice(goal))
    policy_w, policy_l, ref_w, ref_l = jnp.split(mse, 4)
    scale = None
    if options.sdpo:
        residual_w, residual_l = jnp.split(policy.astype(jnp.float32) - goal, 2)
        scale = sdpo_loser_scale(residual_w, residual_l, options.sdpo_mu)
    loss, metrics = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta, scale)
    metrics["dpo_loss"] = loss
    if options.sdpo:
        metrics["sdpo_lambda"] = scale
    if options.sft_weight:
        metrics["sft_loss"] = policy_w.mean()
        loss = loss + options.sft_weight * metrics["sft_loss"]
    if options.preserve_weight:
        metrics["preserve_loss"] = preservation_loss(policy_retain, reference_retain)
        loss = loss + options.preserve_weight * metrics["preserve_loss"]
    metrics["loss"] = loss
    return loss, metrics


def diffusion_sft_loss(
    apply_fn,
    params,
    trainable: dict,
    batch: dict,
    schedule: DDPMSchedule,
    key: jax.Array,
    options: DPOOptions = DPOOptions(),
) -> tuple[jax.Array, dict]:
    """The SFT baseline on the preferred latents of `batch` (same arguments as
    `diffusion_dpo_loss`; latents_l is ignored; of `options` only the noise options apply).
    One policy call of batch B."""
    noisy, goal, t = _noised(key, (batch["latents_w"],), schedule, options)
    pred = apply_fn(
        {"params": params, **trainable},
        noisy,
        t,
        batch["encoder_hidden_states"],
        batch.get("added_cond"),
        batch.get("user_tokens"),
    )
    return sft_loss(per_example_mse(pred, goal))
