"""The Diffusion-DPO loss: hand-computed values, gradient direction, B = 0 equals the reference,
the noising against diffusers, and the LoRA gradient on the tiny UNet never building a full-size
weight gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from safealign_jax import UserError, dpo, lora
from safealign_jax.schedulers import ddpm_schedule, scheduler_config_from_dict
from safealign_jax.trainable import Trainable

BETA = 5000.0


def sd_schedule(prediction_type: str):
    """Stable Diffusion's DDPM training schedule with the given prediction type."""
    return ddpm_schedule(scheduler_config_from_dict({
        "_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "prediction_type": prediction_type,
    }))


def scaled_linear_alphas_cumprod() -> np.ndarray:
    return np.asarray(sd_schedule("epsilon").alphas_cumprod)


def neg_log_sigmoid(z):
    return np.log1p(np.exp(-np.asarray(z, np.float64)))


def test_per_example_mse():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    target = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    ours = dpo.per_example_mse(jnp.asarray(pred, jnp.bfloat16), target)
    assert ours.shape == (3,) and ours.dtype == jnp.float32
    expected = ((pred.astype(jnp.bfloat16).astype(np.float64) - target) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_dpo_loss_hand_computed():
    policy_w = np.array([0.10, 0.30, 0.20, 0.50], np.float32)
    policy_l = np.array([0.20, 0.10, 0.40, 0.30], np.float32)
    ref_w = np.array([0.12, 0.25, 0.20, 0.50], np.float32)
    ref_l = np.array([0.18, 0.12, 0.40, 0.60], np.float32)
    beta = 50.0
    # d = (-0.1 + 0.06, 0.2 - 0.13, 0 (a tie), 0.2 + 0.1); margins -(beta/2) d = (1, -1.75, 0, -7.5)
    margin = -(beta / 2) * ((policy_w - policy_l) - (ref_w - ref_l)).astype(np.float64)
    np.testing.assert_allclose(margin, [1.0, -1.75, 0.0, -7.5], atol=1e-5)
    assert margin[2] == 0
    loss, metrics = dpo.dpo_loss(policy_w, policy_l, ref_w, ref_l, beta)
    expected_loss = neg_log_sigmoid(margin).mean()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert metrics["loss"] == loss
    # by hand: the errors sum to 1.10 (policy, winners), 1.00 (policy, losers), 1.07 (reference,
    # winners) and 1.30 (reference, losers); the margins to 1 - 1.75 + 0 - 7.5 = -8.25
    expected = {
        "implicit_accuracy": (1 + 0 + 0.5 + 0) / 4,
        "reward_margin": -8.25 / 4,
        "mse_w_diff": (1.10 - 1.07) / 4,
        "mse_l_diff": (1.00 - 1.30) / 4,
        "mse_policy_w": 1.10 / 4,
        "mse_policy_l": 1.00 / 4,
        "mse_ref_w": 1.07 / 4,
        "mse_ref_l": 1.30 / 4,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert set(metrics) == set(expected) | {"loss"}


def test_dpo_loss_is_stable_at_large_margins():
    """beta = 5000 with |d| = 1 gives margins of -+2500: no overflow, exact asymptotes."""
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    policy_w = np.array([1.0, 0.0], np.float32)
    policy_l = np.array([0.0, 1.0], np.float32)
    loss, grad = jax.value_and_grad(lambda w: dpo.dpo_loss(w, policy_l, zeros, zeros, BETA)[0])(policy_w)
    np.testing.assert_allclose(loss, (2500 + 0) / 2, rtol=1e-6)
    assert np.isfinite(grad).all()
    loss, _ = dpo.dpo_loss(ones, ones, ones, ones, BETA)
    assert loss == np.float32(np.log(2))


def test_gradient_moves_the_model_toward_the_winner():
    """A one-parameter model predicting theta everywhere, winner target +1, loser target -1, the
    reference at theta = 0: lowering the winner's error lowers the loss, and one SGD step makes
    the winner better and the loser worse than under the reference."""
    shape = (1, 2, 2, 1)
    target_w, target_l = np.ones(shape, np.float32), -np.ones(shape, np.float32)

    def loss_fn(theta):
        pred = jnp.full(shape, theta)
        mse = lambda p, target: dpo.per_example_mse(p, target)  # noqa: E731
        ref = jnp.zeros(shape)
        return dpo.dpo_loss(mse(pred, target_w), mse(pred, target_l), mse(ref, target_w), mse(ref, target_l), BETA)

    loss_fn = jax.jit(loss_fn)
    (loss, _), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(0.0)
    # d = (theta - 1)^2 - (theta + 1)^2 = -4 theta; dloss/dtheta at 0 = -(beta/2) * 4 * sigmoid(0).
    np.testing.assert_allclose(grad, -BETA, rtol=1e-6)
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    theta = 0.0 - 1e-5 * grad
    loss, metrics = loss_fn(theta)
    assert theta > 0
    assert metrics["mse_w_diff"] < 0 < metrics["mse_l_diff"]
    assert loss < np.log(2) and metrics["reward_margin"] > 0 and metrics["implicit_accuracy"] == 1


def test_sft_loss():
    loss, metrics = dpo.sft_loss(np.array([1.0, 2.0, 6.0], np.float32))
    assert loss == 3.0 and metrics["loss"] == 3.0


def _toy_batch(b=3, seed=0, user_tokens=True):
    rng = np.random.default_rng(seed)
    batch = {
        "latents_w": rng.standard_normal((b, 4, 4, 2), np.float32),
        "latents_l": rng.standard_normal((b, 4, 4, 2), np.float32),
        "encoder_hidden_states": rng.standard_normal((b, 3, 5), np.float32),
        "added_cond": {"text_embeds": rng.standard_normal((b, 6), np.float32)},
    }
    if user_tokens:
        batch["user_tokens"] = rng.standard_normal((b, 1, 5), np.float32)
    return batch


class ToyUNet:
    """A stand-in for `module.apply`: prediction = sample * (1 + theta + per-example conditioning),
    theta read from the "lora" collection (0 when absent). Records the batch size of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, variables, sample, t, context, added_cond, user_tokens):
        self.calls.append((sample.shape[0], set(variables)))
        theta = variables["lora"]["theta"] if "lora" in variables else 0.0
        gain = 1 + theta + t / 1000 + context.mean(axis=(1, 2)) + added_cond["text_embeds"].mean(axis=1)
        if user_tokens is not None:
            gain = gain + user_tokens.mean(axis=(1, 2))
        return sample * gain[:, None, None, None]


TOY_BETA = 100.0  # small enough that float32 rounding of the errors stays far below the tolerance


def _toy_expected(batch, theta, alphas_cumprod, prediction_type, key, objective):
    """The loss recomputed in numpy: one noise and one t per pair, drawn as documented."""
    key_noise, key_t = jax.random.split(key)
    x_w, x_l = (batch[k].astype(np.float64) for k in ("latents_w", "latents_l"))
    noise = np.asarray(jax.random.normal(key_noise, x_w.shape), np.float64)
    t = np.asarray(jax.random.randint(key_t, (x_w.shape[0],), 0, len(alphas_cumprod)))
    ab = alphas_cumprod.astype(np.float64)[t][:, None, None, None]
    gain = 1 + t / 1000 + batch["encoder_hidden_states"].mean(axis=(1, 2))
    gain = gain + batch["added_cond"]["text_embeds"].mean(axis=1)
    if "user_tokens" in batch:
        gain = gain + batch["user_tokens"].mean(axis=(1, 2))
    gain = gain[:, None, None, None]

    def mse(x0, th):
        noisy = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
        target = noise if prediction_type == "epsilon" else np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0
        return ((noisy * (gain + th) - target) ** 2).mean(axis=(1, 2, 3))

    if objective == "sft":
        return mse(x_w, theta).mean()
    margin = -(TOY_BETA / 2) * ((mse(x_w, theta) - mse(x_l, theta)) - (mse(x_w, 0) - mse(x_l, 0)))
    return neg_log_sigmoid(margin).mean()


@pytest.mark.parametrize("prediction_type, user_tokens", [("epsilon", True), ("v_prediction", False)])
def test_diffusion_dpo_loss_on_a_toy_model(prediction_type, user_tokens):
    """Shared noise and t per pair, one policy and one reference call of batch 2B each, the
    reference without the "lora" collection, and the loss equal to a numpy recomputation."""
    batch = _toy_batch(user_tokens=user_tokens)
    alphas_cumprod = scaled_linear_alphas_cumprod()
    key, theta = jax.random.key(3), np.float32(0.01)
    toy = ToyUNet()
    trainable = {"lora": {"theta": theta}}
    loss, metrics = jax.jit(
        lambda trainable, batch, key: dpo.diffusion_dpo_loss(
            toy, {}, trainable, batch, sd_schedule(prediction_type), key, TOY_BETA
        )
    )(trainable, batch, key)
    assert toy.calls == [(6, {"params", "lora"}), (6, {"params"})]
    expected = _toy_expected(batch, theta, alphas_cumprod, prediction_type, key, "dpo")
    np.testing.assert_allclose(loss, expected, rtol=1e-4)  # float32 rounding of d, times beta / 2
    assert 0.1 < expected < 5  # not saturated, so the check means something
    assert metrics["loss"] == loss
    sft, _ = jax.jit(
        lambda trainable, batch, key: dpo.diffusion_sft_loss(
            toy, {}, trainable, batch, sd_schedule(prediction_type), key
        )
    )(trainable, batch, key)
    assert toy.calls[-1] == (3, {"params", "lora"})
    np.testing.assert_allclose(sft, _toy_expected(batch, theta, alphas_cumprod, prediction_type, key, "sft"), rtol=1e-5)


def test_diffusion_dpo_loss_errors():
    batch = _toy_batch()
    batch["latents_l"] = batch["latents_l"][:, :2]
    with pytest.raises(UserError, match=r"latents_w \(3, 4, 4, 2\) and latents_l \(3, 2, 4, 2\)"):
        dpo.diffusion_dpo_loss(ToyUNet(), {}, {}, batch, sd_schedule("epsilon"), jax.random.key(0), BETA)


# --- the tiny UNet with LoRA ----------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_dpo(tiny_unet):
    """(loss_fn(tree, params, key), jitted value_and_grad of it, fresh LoRA tree, params)."""
    module, params = tiny_unet
    config = lora.LoRAConfig(rank=2)
    tree = lora.init(jax.random.key(0), params, config)
    rng = np.random.default_rng(0)
    batch = {
        "latents_w": rng.standard_normal((2, 16, 16, 4), np.float32),
        "latents_l": rng.standard_normal((2, 16, 16, 4), np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 7, 32), np.float32),
    }

    def loss_fn(tree, params, key):
        trainable = Trainable({"lora": tree}, {"lora": config.scale}).collections()
        return dpo.diffusion_dpo_loss(module.apply, params, trainable, batch, sd_schedule("epsilon"), key, BETA)

    return loss_fn, jax.jit(jax.value_and_grad(loss_fn, has_aux=True)), tree, params


def test_lora_at_init_equals_the_reference_and_one_step_prefers_the_winner(unet_dpo):
    _, value_and_grad, tree, params = unet_dpo
    key = jax.random.key(7)
    (loss, metrics), grads = value_and_grad(tree, params, key)
    # b = 0: the policy is exactly the reference, every pair is a tie.
    assert metrics["mse_policy_w"] == metrics["mse_ref_w"] and metrics["mse_policy_l"] == metrics["mse_ref_l"]
    assert metrics["reward_margin"] == 0
    assert loss == np.float32(np.log(2))
    assert metrics["implicit_accuracy"] == 0.5
    flat = traverse_util.flatten_dict(grads)
    assert all(not np.asarray(g).any() for p, g in flat.items() if p[-1] == "a")  # d/da = x^T g b^T = 0
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in flat.values()))
    assert norm > 0
    # One normalised SGD step on the same noise and t: the winner improves relative to the loser.
    stepped = jax.tree_util.tree_map(lambda w, g: w - 1e-4 * g / norm, tree, grads)
    (new_loss, new_metrics), _ = value_and_grad(stepped, params, key)
    print(f"one step: loss {float(loss):.4f} -> {float(new_loss):.4f}, margin {float(new_metrics['reward_margin']):.3f}")
    assert new_loss < loss
    assert new_metrics["reward_margin"] > 0
    assert new_metrics["mse_w_diff"] < new_metrics["mse_l_diff"]


def _output_shapes(jaxpr) -> list[tuple[str, tuple[int, ...]]]:
    """(primitive, output shape) of every equation of `jaxpr` and of all its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        found.extend((eqn.primitive.name, tuple(v.aval.shape)) for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    found.extend(_output_shapes(inner))
    return found


def test_lora_gradient_never_builds_a_full_weight_gradient(unet_dpo):
    """No equation of the LoRA gradient computation outputs an array shaped like an adapted
    kernel (in, out) or its transpose; the same loss differentiated w.r.t. the full params does,
    once per adapted kernel at least (the control that shows the check can see them)."""
    loss_fn, _, tree, params = unet_dpo
    key = jax.random.key(0)
    flat = traverse_util.flatten_dict(params)
    shapes = {tuple(flat[(*p.split("/"), "kernel")].shape) for p in lora.targets(params)}
    shapes |= {s[::-1] for s in shapes}
    lora_grad = jax.make_jaxpr(jax.value_and_grad(loss_fn, has_aux=True))(tree, params, key)
    full_grad = jax.make_jaxpr(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))(tree, params, key)
    lora_hits = [x for x in _output_shapes(lora_grad.jaxpr) if x[1] in shapes]
    full_hits = [x for x in _output_shapes(full_grad.jaxpr) if x[1] in shapes and x[0] == "dot_general"]
    assert lora_hits == []
    assert len(full_hits) >= len(lora.targets(params))
