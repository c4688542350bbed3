"""The jitted train step: caption dropout, value_and_grad of the loss w.r.t. the trainable tree
only, optimizer update. Compiled ahead of time once with explicit shardings and a donated state.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from safealign_jax.train.state import TrainState

# loss_fn(trainable, params, batch, key) -> (scalar loss, dict of scalar metrics)
LossFn = Callable


def drop_captions(batch: dict, empty_embedding: jax.Array, rate: float, key: jax.Array) -> dict:
    """Replaces each pair's encoder_hidden_states (B, S, D) by the empty-prompt embedding (S, D)
    with probability `rate` (one draw per pair, shared by its two images)."""
    if rate <= 0:
        return batch
    context = batch["encoder_hidden_states"]
    drop = jax.random.bernoulli(key, rate, (context.shape[0],))
    empty = jnp.broadcast_to(empty_embedding.astype(context.dtype), context.shape)
    return {**batch, "encoder_hidden_states": jnp.where(drop[:, None, None], empty, context)}


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, caption_dropout: float):
    """step(state, params, batch, empty_embedding) -> (new state, metrics of device scalars)."""

    def step(state: TrainState, params, batch: dict, empty_embedding: jax.Array):
        key, drop_key, loss_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
        batch = drop_captions(batch, empty_embedding, caption_dropout, drop_key)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.trainable, params, batch, loss_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient never reaches the weights or the optimizer state: the
        # step keeps the old ones (bitwise) and reports nonfinite = 1; the loop stops or skips.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(optax.apply_updates(state.trainable, updates), state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(key),
        )
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm,
                           "nonfinite": 1.0 - finite.astype(jnp.float32)}

    return step


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`, for ahead-of-time lowering."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s), tree, shardings
    )


def compile_step(step, state, state_shardings, params, params_shardings, batch, batch_sharding,
                 empty_embedding, replicated):
    """`jax.jit(step)` with explicit in/out shardings and donated state, lowered and compiled once
    for the shapes of the given (possibly abstract) arguments."""
    batch_shardings = jax.tree.map(lambda _: batch_sharding, batch)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, params_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return jitted.lower(
        abstract(state, state_shardings),
        abstract(params, params_shardings),
        abstract(batch, batch_shardings),
        jax.ShapeDtypeStruct(jnp.shape(empty_embedding), jnp.result_type(empty_embedding),
                             sharding=replicated),
    ).compile()
