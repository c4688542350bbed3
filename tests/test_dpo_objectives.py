"""The terms beside the paper's Diffusion-DPO (SFT, preservation on retain prompts, the
Diffusion-SDPO safeguard), the noise options, retain-prompt files, the trainer's wiring and
warning, and the fair all-single baseline of scripts/train_experts.py.

Values are recomputed by hand in float64 numpy on a toy UNet that is linear in its input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helper import tiny_config

from safealign_jax import dpo
from safealign_jax.errors import UserError
from safealign_jax.schedulers import ddpm_schedule, scheduler_config_from_dict
from safealign_jax.train import objective
from safealign_jax.train.loop import winner_warning

BETA = 100.0  # small enough that float32 rounding of the errors stays far below the tolerances
SCHEDULE = ddpm_schedule(scheduler_config_from_dict(dict(objective.SD_SCHEDULE, prediction_type="epsilon")))
ALPHAS = np.asarray(SCHEDULE.alphas_cumprod, np.float64)


class LinearToy:
    """prediction = sample * (1 + theta + t / 1000 + mean(text states) + mean(pooled)), theta from
    the "lora" collection (0 for the reference). Records its (unjitted) inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, variables, sample, t, context, added_cond, user_tokens):
        self.calls.append((np.asarray(sample), set(variables)))
        theta = variables["lora"]["theta"] if "lora" in variables else 0.0
        gain = 1 + theta + t / 1000 + context.mean(axis=(1, 2)) + added_cond["text_embeds"].mean(axis=1)
        return sample * gain[:, None, None, None]


def toy_batch(b=3, seed=0, retain=True):
    rng = np.random.default_rng(seed)
    batch = {
        "latents_w": rng.standard_normal((b, 4, 4, 2)).astype(np.float32),
        "latents_l": rng.standard_normal((b, 4, 4, 2)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((b, 3, 5)).astype(np.float32),
        "added_cond": {"text_embeds": rng.standard_normal((b, 6)).astype(np.float32),
                       "time_ids": np.zeros((b, 6), np.float32)},
    }
    if retain:
        batch["retain_hidden_states"] = rng.standard_normal((b, 3, 5)).astype(np.float32)
        batch["retain_text_embeds"] = rng.standard_normal((b, 6)).astype(np.float32)
    return batch


def documented_draw(key, shape):
    """eps and t as `dpo` documents them: split(key) -> (noise key, t key)."""
    key_noise, key_t = jax.random.split(key)
    noise = np.asarray(jax.random.normal(key_noise, shape), np.float64)
    return noise, np.asarray(jax.random.randint(key_t, (shape[0],), 0, 1000))


def gain(context, pooled, t):
    return (1 + t / 1000 + context.astype(np.float64).mean(axis=(1, 2)) + pooled.mean(axis=1))[:, None, None, None]


def neg_log_sigmoid(z):
    return np.log1p(np.exp(-z))


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def by_hand(batch, theta, key, beta=BETA, mu=None):
    """Every term of the objective in float64, and d loss / d theta of the DPO term."""
    x_w, x_l = (batch[k].astype(np.float64) for k in ("latents_w", "latents_l"))
    noise, t = documented_draw(key, x_w.shape)
    ab = ALPHAS[t][:, None, None, None]
    noisy_w, noisy_l = (np.sqrt(ab) * x + np.sqrt(1 - ab) * noise for x in (x_w, x_l))
    g = gain(batch["encoder_hidden_states"], batch["added_cond"]["text_embeds"], t)
    res = {name: noisy * (g + th) - noise for name, noisy, th in
           (("pw", noisy_w, theta), ("pl", noisy_l, theta), ("rw", noisy_w, 0), ("rl", noisy_l, 0))}
    m = {k: (r**2).mean(axis=(1, 2, 3)) for k, r in res.items()}
    margin = -(beta / 2) * ((m["pw"] - m["pl"]) - (m["rw"] - m["rl"]))
    lam = 1.0
    if mu is not None:
        aligned = (res["pl"] * res["pw"]).sum()
        lam = float(np.clip((1 - mu) * (res["pw"] ** 2).sum() / aligned, 0, 1)) if aligned > 0 else 1.0
    grad_w = (2 * res["pw"] * noisy_w).mean(axis=(1, 2, 3))  # d m_theta(x_w) / d theta
    grad_l = (2 * res["pl"] * noisy_l).mean(axis=(1, 2, 3))
    out = {
        "dpo_loss": neg_log_sigmoid(margin).mean(),
        "dpo_grad": (sigmoid(-margin) * (beta / 2) * (grad_w - lam * grad_l)).mean(),
        "sft_loss": m["pw"].mean(),
        "sdpo_lambda": lam,
    }
    if "retain_hidden_states" in batch:  # policy - reference on the retain prompts = noisy_w * theta
        out["preserve_loss"] = ((noisy_w * theta) ** 2).mean()
    return out


def run_loss(batch, theta, key, options, toy=None):
    toy = toy or LinearToy()
    fn = lambda th: dpo.diffusion_dpo_loss(toy, {}, {"lora": {"theta": th}}, batch, SCHEDULE, key, BETA, options)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.float32(theta))
    return float(loss), {k: float(v) for k, v in metrics.items()}, float(grad), toy


# --- each term by hand ----------------------------------------------------------------------


def test_sft_and_preservation_terms_by_hand():
    batch, key, theta = toy_batch(), jax.random.key(3), 0.01
    options = dpo.DPOOptions(sft_weight=0.7, preserve_weight=10.0)
    loss, metrics, grad, toy = run_loss(batch, theta, key, options)
    # one policy and one reference call of [w; l; w with the retain prompts] = 3B rows
    assert [(s.shape[0], v) for s, v in toy.calls] == [(9, {"params", "lora"}), (9, {"params"})]
    policy_sample = toy.calls[0][0]
    np.testing.assert_array_equal(policy_sample[6:], policy_sample[:3])  # the noised winners again
    hand = by_hand(batch, theta, key)
    assert 0.1 < hand["dpo_loss"] < 5 and hand["preserve_loss"] > 1e-6  # the checks mean something
    for name in ("dpo_loss", "sft_loss", "preserve_loss"):
        np.testing.assert_allclose(metrics[name], hand[name], rtol=2e-4, err_msg=name)
    total = hand["dpo_loss"] + 0.7 * hand["sft_loss"] + 10 * hand["preserve_loss"]
    np.testing.assert_allclose(loss, total, rtol=2e-4)
    assert metrics["loss"] == loss and "sdpo_lambda" not in metrics
    # d/dtheta: DPO + 0.7 * mean d m_w / d theta + 10 * mean 2 theta noisy_w^2
    x_w = batch["latents_w"].astype(np.float64)
    noise, t = documented_draw(key, x_w.shape)
    ab = ALPHAS[t][:, None, None, None]
    noisy_w = np.sqrt(ab) * x_w + np.sqrt(1 - ab) * noise
    g = gain(batch["encoder_hidden_states"], batch["added_cond"]["text_embeds"], t)
    sft_grad = (2 * (noisy_w * (g + theta) - noise) * noisy_w).mean()
    np.testing.assert_allclose(grad, hand["dpo_grad"] + 0.7 * sft_grad + 10 * (2 * theta * noisy_w**2).mean(),
                               rtol=1e-3)


def test_zero_weights_are_the_papers_loss_bit_for_bit():
    """Weights 0 (even with retain prompts in the batch) and the defaults: the same program,
    loss and gradient bitwise; the metrics are the paper's plus dpo_loss == loss."""
    batch, key = toy_batch(), jax.random.key(5)
    paper = run_loss(toy_batch(retain=False), 0.02, key, dpo.DPOOptions())
    zeros = run_loss(batch, 0.02, key, dpo.DPOOptions(sft_weight=0.0, preserve_weight=0.0, noise_offset=0.0,
                                                      input_perturbation=0.0, sdpo=False))
    assert paper[0] == zeros[0] and paper[2] == zeros[2] and paper[1] == zeros[1]
    assert [s.shape[0] for s, _ in zeros[3].calls] == [6, 6]
    assert paper[1]["dpo_loss"] == paper[0] == paper[1]["loss"]
    assert set(paper[1]) == {"loss", "dpo_loss", "implicit_accuracy", "reward_margin", "mse_w_diff",
                             "mse_l_diff", "mse_policy_w", "mse_policy_l", "mse_ref_w", "mse_ref_l"}
    hand = by_hand(batch, 0.02, key)
    np.testing.assert_allclose(paper[0], hand["dpo_loss"], rtol=2e-4)
    np.testing.assert_allclose(paper[2], hand["dpo_grad"], rtol=1e-3)


def test_preservation_needs_matching_retain_states():
    batch = toy_batch(retain=False)
    options = dpo.DPOOptions(preserve_weight=1.0)
    with pytest.raises(UserError, match="retain_hidden_states"):
        run_loss(batch, 0.0, jax.random.key(0), options)
    batch = toy_batch()
    batch["retain_hidden_states"] = batch["retain_hidden_states"][:, :2]
    with pytest.raises(UserError, match=r"retain prompt states \(3, 2, 5\) must match .* \(3, 3, 5\)"):
        run_loss(batch, 0.0, jax.random.key(0), options)


# --- Diffusion-SDPO -------------------------------------------------------------------------


def test_sdpo_lambda_and_gradient_by_hand_on_the_toy():
    """lambda = clip((1 - mu) |r_w|^2 / <r_l, r_w>, 0, 1) over the batch's residuals; the loss
    value is the paper's, the gradient is sum_i s_i (grad m_w,i - lambda grad m_l,i)."""
    batch, key, theta = toy_batch(retain=False), jax.random.key(3), 0.01
    loss, metrics, grad, _ = run_loss(batch, theta, key, dpo.DPOOptions(sdpo=True, sdpo_mu=0.5))
    hand = by_hand(batch, theta, key, mu=0.5)
    assert 0.05 < hand["sdpo_lambda"] < 0.95  # the cap is active: a real test of the rule
    np.testing.assert_allclose(metrics["sdpo_lambda"], hand["sdpo_lambda"], rtol=1e-5)
    np.testing.assert_allclose(loss, hand["dpo_loss"], rtol=2e-4)
    np.testing.assert_allclose(grad, hand["dpo_grad"], rtol=1e-3)
    plain = by_hand(batch, theta, key)
    assert abs(grad - plain["dpo_grad"]) > 0.05 * abs(plain["dpo_grad"])  # it does change the step


def test_sdpo_loser_scale_cases():
    r_w = jnp.array([[1.0, 2.0]])
    np.testing.assert_allclose(dpo.sdpo_loser_scale(r_w, jnp.array([[2.0, 4.0]]), 0.0), 5 / 10)
    np.testing.assert_allclose(dpo.sdpo_loser_scale(r_w, jnp.array([[2.0, 4.0]]), 0.9), 0.1 * 5 / 10, rtol=1e-6)
    assert dpo.sdpo_loser_scale(r_w, jnp.array([[1.0, 1.0]]), 0.0) == 1.0  # 5 / 3 clipped to 1
    assert dpo.sdpo_loser_scale(r_w, jnp.array([[-1.0, 0.0]]), 0.0) == 1.0  # opposed: no constraint
    assert dpo.sdpo_loser_scale(r_w, jnp.array([[2.0, -1.0]]), 0.0) == 1.0  # orthogonal: no constraint
    grad = jax.grad(lambda r: dpo.sdpo_loser_scale(r, 2 * r, 0.0))(r_w)
    assert not np.asarray(grad).any()  # behind a stop_gradient


def _winner_error_after_one_step(mu, eta=1e-5):
    """A model whose prediction is its parameter vector theta (so output space = parameter space),
    winner target a, loser target 2a + b with b orthogonal to a: the loser's residual is aligned
    with the winner's, so plain DPO raises the winner's error to buy margin."""
    a = np.array([1.0, 0.5, -0.5, 0.25], np.float32)
    b = np.array([0.5, -1.0, 0.0, 0.0], np.float32)
    target_w, target_l = a[None], (2 * a + b)[None]

    def errors(theta):
        return dpo.per_example_mse(theta[None], target_w), dpo.per_example_mse(theta[None], target_l)

    ref_w, ref_l = errors(jnp.zeros(4))

    def loss(theta):
        m_w, m_l = errors(theta)
        scale = None if mu is None else dpo.sdpo_loser_scale(theta[None] - target_w, theta[None] - target_l, mu)
        return dpo.dpo_loss(m_w, m_l, ref_w, ref_l, 5000.0, scale)[0]

    theta = np.asarray(-eta * jax.grad(loss)(jnp.zeros(4)), np.float64)
    return float(np.mean((theta - a) ** 2) - np.mean(a.astype(np.float64) ** 2)), theta


def test_sdpo_keeps_the_winner_where_plain_dpo_raises_it():
    rise_plain, _ = _winner_error_after_one_step(None)
    rise_sdpo, _ = _winner_error_after_one_step(0.5)
    assert rise_plain > 0 and rise_sdpo < 0
    # mu = 0: lambda = |a|^2 / <2a + b, a> = 1/2 and the update is orthogonal to the winner's
    # gradient: its error changes only at second order (|step|^2 / 4), not at first.
    rise_zero, step = _winner_error_after_one_step(0.0)
    np.testing.assert_allclose(rise_zero, np.sum(step**2) / 4, rtol=1e-3)
    assert 0 < rise_zero < 0.05 * rise_plain


# --- noise options --------------------------------------------------------------------------


def test_pair_noise_options():
    key, shape = jax.random.key(11), (3, 4, 4, 2)
    eps, t = dpo._draw(key, shape, 1000)
    plain = dpo.pair_noise(key, shape, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(plain, (eps, eps, t), strict=True))
    key_offset, key_perturbation = jax.random.split(jax.random.fold_in(key, 1))
    with_offset, target_noise, t2 = dpo.pair_noise(key, shape, 1000, noise_offset=0.3)
    offset = 0.3 * np.asarray(jax.random.normal(key_offset, (3, 1, 1, 2)))
    np.testing.assert_allclose(target_noise, np.asarray(eps) + offset, rtol=1e-6)
    assert np.array_equal(with_offset, target_noise) and np.array_equal(t2, t)
    noised_with, target_noise2, _ = dpo.pair_noise(key, shape, 1000, noise_offset=0.3, input_perturbation=0.1)
    assert np.array_equal(target_noise2, target_noise)  # the target keeps the unperturbed noise
    np.testing.assert_allclose(noised_with - target_noise2,
                               0.1 * np.asarray(jax.random.normal(key_perturbation, shape)), atol=1e-6)


def test_noise_options_change_only_the_input_and_are_shared_by_the_pair():
    batch, key, theta = toy_batch(retain=False), jax.random.key(2), 0.01
    options = dpo.DPOOptions(noise_offset=0.3, input_perturbation=0.1)
    _, metrics, _, toy = run_loss(batch, theta, key, options)
    sample = toy.calls[0][0].astype(np.float64)
    noised_with, noise, t = (np.asarray(x, np.float64) for x in dpo.pair_noise(key, (3, 4, 4, 2), 1000, 0.3, 0.1))
    ab = ALPHAS[t.astype(int)][:, None, None, None]
    x_w, x_l = (batch[k].astype(np.float64) for k in ("latents_w", "latents_l"))
    np.testing.assert_allclose(sample[:3], np.sqrt(ab) * x_w + np.sqrt(1 - ab) * noised_with, atol=1e-5)
    np.testing.assert_allclose(sample[3:], np.sqrt(ab) * x_l + np.sqrt(1 - ab) * noised_with, atol=1e-5)
    g = gain(batch["encoder_hidden_states"], batch["added_cond"]["text_embeds"], t)
    for name, rows, th in (("mse_policy_w", slice(0, 3), theta), ("mse_ref_l", slice(3, 6), 0.0)):
        expected = ((sample[rows] * (g + th) - noise) ** 2).mean()  # target: the clean noise
        np.testing.assert_allclose(metrics[name], expected, rtol=1e-4, err_msg=name)
        wrong = ((sample[rows] * (g + th) - noised_with) ** 2).mean()
        assert abs(wrong - expected) > 1e-3 * expected


# --- retain prompts, config, warning --------------------------------------------------------


def test_retain_prompt_files(tmp_path):
    text = tmp_path / "retain.txt"
    text.write_text("a cat\n\n  a city street at night  \n")
    assert objective.read_retain_prompts(str(text)) == ["a cat", "a city street at night"]
    table = tmp_path / "retain.csv"
    table.write_text('id,prompt,category\n1,"a dog, running",x\n2,,y\n3,a bowl of fruit,z\n')
    assert objective.read_retain_prompts(str(table)) == ["a dog, running", "a bowl of fruit"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,caption\n1,a cat\n")
    with pytest.raises(UserError, match="no 'prompt' column"):
        objective.read_retain_prompts(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompts"):
        objective.read_retain_prompts(str(empty))
    with pytest.raises(UserError, match="no such file"):
        objective.read_retain_prompts(str(tmp_path / "missing.txt"))


def test_retain_draw_is_per_step_and_agrees_across_row_slices():
    states = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 3), np.float32)
    retain = objective.RetainPrompts(states, np.arange(5, dtype=np.float32)[:, None] * np.ones((5, 4)))
    full = retain.draw(0, 7, slice(0, 8), 8)
    assert full["retain_hidden_states"].shape == (8, 2, 3) and full["retain_text_embeds"].shape == (8, 4)
    assert np.array_equal(full["retain_hidden_states"][:, 0, 0], full["retain_text_embeds"][:, 0])  # same rows
    half = retain.draw(0, 7, slice(4, 8), 8)
    assert np.array_equal(half["retain_hidden_states"], full["retain_hidden_states"][4:])
    assert not np.array_equal(retain.draw(0, 8, slice(0, 8), 8)["retain_hidden_states"],
                              full["retain_hidden_states"])
    assert "retain_text_embeds" not in objective.RetainPrompts(states, None).draw(0, 0, slice(0, 2), 2)


def test_retain_prompts_need_a_pipeline_folder(tmp_path):
    with pytest.raises(UserError, match="not in a diffusers pipeline folder"):
        objective.RetainPrompts.encode(str(tmp_path), ["a cat"])


@pytest.mark.parametrize("field, value, fragment", [
    ("dpo.objective", "ipo", "dpo.objective='ipo'"),
    ("dpo.sft_weight", -1.0, "dpo.sft_weight=-1.0"),
    ("dpo.sdpo_mu", 1.0, "dpo.sdpo_mu=1.0"),
    ("dpo.noise_offset", -0.1, "dpo.noise_offset=-0.1"),
    ("dpo.preserve_weight", 1.0, "dpo.retain_prompts=''"),
])
def test_options_from_config_errors(field, value, fragment):
    with pytest.raises(UserError) as e:
        objective.options_from_config(tiny_config({field: value}))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_options_from_config():
    assert objective.options_from_config(tiny_config({})) == dpo.DPOOptions()
    config = tiny_config({"dpo.sft_weight": 1.0, "dpo.preserve_weight": 10.0, "dpo.retain_prompts": "r.txt",
                          "dpo.sdpo": True, "dpo.sdpo_mu": 0.6, "dpo.noise_offset": 0.05,
                          "dpo.input_perturbation": 0.1})
    assert objective.options_from_config(config) == dpo.DPOOptions(1.0, 10.0, True, 0.6, 0.05, 0.1)
    with pytest.raises(UserError, match="objective='sft' takes no"):
        objective.options_from_config(tiny_config({"dpo.objective": "sft", "dpo.sdpo": True}))


def test_winner_warning():
    records = [{"step": 5, "mse_w_diff": 0.03}, {"step": 6, "mse_w_diff": -0.01}]
    message = winner_warning(records)
    assert message.count("\n") == 0 and "steps 5-6" in message and "rose by 0.01 " in message
    assert "dpo.sft_weight / dpo.sdpo" in message
    assert winner_warning([{"step": 1, "mse_w_diff": -0.02}, {"step": 2, "mse_w_diff": 0.01}]) is None
    assert winner_warning([{"step": 1, "loss": 0.3}]) is None  # SFT runs log no mse_w_diff


# --- the trainer and the experts script -----------------------------------------------------


def test_trainer_runs_and_logs_the_new_terms(tmp_path, capsys):
    """Tiny pipeline folder: retain prompts encoded by its text encoder, all options on, 4 steps."""
    from pipelines import build_sd

    from safealign_jax.train.loop import train

    folder = build_sd(tmp_path)
    prompts = tmp_path / "retain.txt"
    prompts.write_text("a cat\na dog\na house\n")
    config = tiny_config({
        "model.path": folder, "data.seq_len": 16, "data.resolution": 64, "train.steps": 4,
        "train.log_every": 2, "train.checkpoint_every": 4, "train.async_checkpoints": False,
        "dpo.beta": 50.0, "dpo.sft_weight": 1.0, "dpo.preserve_weight": 10.0,
        "dpo.retain_prompts": str(prompts), "dpo.sdpo": True, "dpo.noise_offset": 0.05,
        "dpo.input_perturbation": 0.1,
    })
    _, summary = train(config, str(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert {"dpo_loss", "sft_loss", "preserve_loss", "sdpo_lambda"} <= set(r)
        np.testing.assert_allclose(r["loss"], r["dpo_loss"] + r["sft_loss"] + 10 * r["preserve_loss"], rtol=1e-5)
        assert 0 <= r["sdpo_lambda"] <= 1 and np.isfinite(r["loss"])
    assert lines[0]["preserve_loss"] == 0  # the LoRA starts at the reference (B = 0)
    assert lines[-1]["preserve_loss"] > 0 and summary["final"]["step"] == 4
    warnings = [x for x in capsys.readouterr().out.splitlines() if "winner's error rose" in x]
    rose = [np.mean([r["mse_w_diff"] for r in lines[i:i + 2]]) > 0 for i in (0, 2)]
    assert len(warnings) == sum(rose)  # at most one line per log step, exactly when it rose

    wrong = tiny_config({"dpo.preserve_weight": 1.0, "dpo.retain_prompts": str(prompts)})  # random UNet
    with pytest.raises(UserError, match="not in a diffusers pipeline folder"):
        train(wrong, str(tmp_path / "wrong"))


def test_all_single_gets_the_experts_steps():
    from safealign_jax.commands.train_experts import jobs
    from safealign_jax.data.categories import COPROV2

    categories = list(COPROV2.categories)  # a CoProV2 cache's index
    config = tiny_config({"experts.categories": "Hate,Violence,sexual", "train.steps": 10})
    assert jobs(config, categories) == [("experts/hate", "Hate", 10), ("experts/violence", "Violence", 10),
                                        ("experts/sexual", "Sexual", 10)]
    config.experts.all_single = True
    assert jobs(config, categories)[-1] == ("all_single", "", 30)
    config.experts.all_single_steps = 12
    assert jobs(config, categories)[-1] == ("all_single", "", 12)
    config.experts.categories = ""
    config.experts.all_single_steps = 0
    assert jobs(config, categories)[-1] == ("all_single", "", 7 * 10)
    config.experts.all_single_steps = -1
    with pytest.raises(UserError, match="all_single_steps=-1"):
        jobs(config, categories)


def test_experts_default_to_the_caches_categories():
    """Free-text categories of a pairs table: one expert each, in the cache's order; a name of
    experts.categories is matched to the cache's spelling, an unknown one refused."""
    from safealign_jax.commands.train_experts import jobs

    config = tiny_config({"train.steps": 4})
    assert jobs(config, ["cats on sofas", "Rusty-Tools"]) == [("experts/cats_on_sofas", "cats on sofas", 4),
                                                              ("experts/rusty_tools", "Rusty-Tools", 4)]
    config.experts.categories = "rusty tools"
    assert jobs(config, ["cats on sofas", "Rusty-Tools"]) == [("experts/rusty_tools", "Rusty-Tools", 4)]
    config.experts.categories = "Hate"
    with pytest.raises(UserError, match="unknown category 'Hate'; the data set's categories are 'cats on sofas'"):
        jobs(config, ["cats on sofas", "Rusty-Tools"])
