"""The Diffusion-DPO loss (and the SFT baseline) as pure functions.

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
        trainable = {"lora": lora.variables(lora_tree, cfg.scale)}
        return diffusion_dpo_loss(module.apply, params, trainable, batch, schedule, key, beta)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora_tree)

Shapes: latents (B, H, W, C) NHWC; encoder_hidden_states (B, S, D); all losses float32.
"""

import jax
import jax.numpy as jnp

from safealign_jax.errors import check
from safealign_jax.schedulers import DDPMSchedule, add_noise, target


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of (pred - target)^2 over every axis but the first, in float32: (B, ...) -> (B,)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return err.mean(axis=tuple(range(1, err.ndim)))


def dpo_loss(
    mse_policy_w: jax.Array,
    mse_policy_l: jax.Array,
    mse_ref_w: jax.Array,
    mse_ref_l: jax.Array,
    beta: float,
) -> tuple[jax.Array, dict]:
    """The Diffusion-DPO loss from per-pair errors (each (B,)).

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
    d = (policy_w - policy_l) - (ref_w - ref_l)
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


def sft_loss(mse_policy_w: jax.Array) -> tuple[jax.Array, dict]:
    """The SFT baseline: the plain denoising loss on the preferred images. (B,) -> (loss, metrics)."""
    loss = mse_policy_w.astype(jnp.float32).mean()
    return loss, {"loss": loss, "mse_policy_w": loss}


def _draw(key: jax.Array, shape: tuple[int, ...], num_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """eps ~ N(0, I) of `shape` (float32) and t ~ U{0..num_timesteps-1} of shape (shape[0],)."""
    key_noise, key_t = jax.random.split(key)
    noise = jax.random.normal(key_noise, shape, jnp.float32)
    return noise, jax.random.randint(key_t, (shape[0],), 0, num_timesteps)


def _twice(tree):
    """Each array of `tree` (batch first) concatenated with itself: (B, ...) -> (2B, ...)."""
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), tree)


def diffusion_dpo_loss(
    apply_fn,
    params,
    trainable: dict,
    batch: dict,
    schedule: DDPMSchedule,
    key: jax.Array,
    beta: float,
) -> tuple[jax.Array, dict]:
    """The Diffusion-DPO loss of one batch of pairs: policy = base + trainable, reference = base.

    Args:
      apply_fn: `module.apply` of the UNet, called as apply_fn(variables, sample, timesteps,
        encoder_hidden_states, added_cond, user_tokens) -> prediction shaped like sample.
      params: the frozen base params.
      trainable: the extra variable collections of the policy, e.g. {"lora": ...} or
        {"adapter": ...}; the reference runs on {"params": params} alone.
      batch: latents_w, latents_l (B, H, W, C); encoder_hidden_states (B, S, D); optional
        added_cond {"text_embeds", "time_ids"} (SDXL) and user_tokens (B, N, D) (PSA).
      schedule: the model's DDPM training schedule (its prediction_type sets the target);
        t ~ U{0..T-1}.
      key: PRNG key for the noise and timesteps (one eps and one t per pair, shared by w and l).
      beta: the DPO temperature (papers: 5000).
    Returns:
      (loss, metrics) as `dpo_loss`. Both models run once each on the batch [w; l] of 2B.
    """
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    check(
        x_w.shape == x_l.shape,
        f"batch latents_w {x_w.shape} and latents_l {x_l.shape} must have the same shape.",
    )
    noise, t = _draw(key, x_w.shape, schedule.num_train_timesteps)
    # the same noise and timestep for x_w (first half) and x_l (second half)
    t, noise = _twice(t), _twice(noise)
    x0 = jnp.concatenate([x_w, x_l]).astype(jnp.float32)
    sample, goal = add_noise(schedule, x0, noise, t), target(schedule, x0, noise, t)
    conditioning = (
        t,
        _twice(batch["encoder_hidden_states"]),
        _twice(batch.get("added_cond")),
        _twice(batch.get("user_tokens")),
    )
    policy = apply_fn({"params": params, **trainable}, sample, *conditioning)
    reference = jax.lax.stop_gradient(apply_fn({"params": params}, sample, *conditioning))
    # One reduction for all four errors, so that equal predictions give bitwise equal errors
    # (separately compiled reductions may round differently, which beta = 5000 would amplify).
    mse = per_example_mse(jnp.concatenate([policy, reference]), _twice(goal))
    policy_w, policy_l, ref_w, ref_l = jnp.split(mse, 4)
    return dpo_loss(policy_w, policy_l, ref_w, ref_l, beta)


def diffusion_sft_loss(
    apply_fn,
    params,
    trainable: dict,
    batch: dict,
    schedule: DDPMSchedule,
    key: jax.Array,
) -> tuple[jax.Array, dict]:
    """The SFT baseline on the preferred latents of `batch` (same arguments as
    `diffusion_dpo_loss`; latents_l is ignored). One policy call of batch B."""
    x_w = batch["latents_w"]
    noise, t = _draw(key, x_w.shape, schedule.num_train_timesteps)
    x0 = x_w.astype(jnp.float32)
    noisy, goal = add_noise(schedule, x0, noise, t), target(schedule, x0, noise, t)
    pred = apply_fn(
        {"params": params, **trainable},
        noisy,
        t,
        batch["encoder_hidden_states"],
        batch.get("added_cond"),
        batch.get("user_tokens"),
    )
    return sft_loss(per_example_mse(pred, goal))
