"""The train state pytree and the optax optimizer built from the config.

TrainState = (step, trainable, opt_state, rng). `trainable` is the fp32 tree being optimised
(the LoRA tree); the frozen base params are not part of the state.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: micro-steps done
    trainable: Any  # fp32 tree being optimised
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key data


def learning_rate(config, global_pairs: int) -> float:
    """Peak learning rate: `optim.learning_rate`, times pairs per update when scaled."""
    lr = config.optim.learning_rate
    if config.optim.scale_lr_by_pairs:
        lr *= global_pairs * config.optim.grad_accum
    return lr


def lr_schedule(config, peak: float) -> optax.Schedule:
    """Linear warm-up over `optim.warmup_steps` updates, then constant or cosine decay."""
    warm = config.optim.warmup_steps
    updates = max(config.train.steps // config.optim.grad_accum, 1)
    if config.optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(updates, warm + 1), 0.0)
    if warm == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm]
    )


def make_optimizer(config, global_pairs: int) -> optax.GradientTransformation:
    """AdamW or Adafactor with global-norm clipping, the lr schedule and gradient accumulation."""
    schedule = lr_schedule(config, learning_rate(config, global_pairs))
    o = config.optim
    if o.name == "adamw":
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        # As transformers.Adafactor(scale_parameter=False, relative_step=False, clip_threshold=1)
        # in the official SDXL scripts.
        core = optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                               weight_decay_rate=o.weight_decay or None)
    chain = optax.chain(optax.clip_by_global_norm(o.clip_norm), core) if o.clip_norm > 0 else core
    if o.grad_accum > 1:
        return optax.MultiSteps(chain, every_k_schedule=o.grad_accum)
    return chain


def init_state(trainable, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state: step 0, fp32 trainable, optimizer state, rng from `seed`."""
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
