"""Schedules and samplers against diffusers: training tables, noising, and whole sampling
trajectories (eager and inside one jitted fori_loop), plus config errors."""

import inspect
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from torch_reference import relative_error

from safealign_jax import UserError
from safealign_jax.schedulers import (
    SAMPLER_NAMES,
    add_noise,
    ddim,
    ddpm,
    ddpm_schedule,
    dpm_solver,
    euler,
    make_sampler,
    read_scheduler_config,
    step_noise,
    target,
    velocity,
)

SD = {  # Stable Diffusion 1.x's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# (our sampler name, eta, diffusers class, config overrides forced on the diffusers side)
SAMPLERS = {
    "ddim": ("ddim", 0.0, "DDIMScheduler", {}),
    "ddim_eta": ("ddim", 0.7, "DDIMScheduler", {}),
    "euler": ("euler", 0.0, "EulerDiscreteScheduler", {}),
    "euler_ancestral": ("euler_ancestral", 0.0, "EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("dpmpp_2m", 0.0, "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": (
        "dpmpp_2m_karras",
        0.0,
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
    ),
}
SHAPE = (2, 8, 8, 4)
TOLERANCE = 1e-5


def write_pipeline(tmp_path, config: dict) -> str:
    """A pipeline folder holding only scheduler/scheduler_config.json."""
    folder = tmp_path / "pipe"
    os.makedirs(folder / "scheduler", exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return str(folder)


def reference_scheduler(folder: str, target_class: str, overrides: dict):
    """diffusers' way: load the file's class, then `Target.from_config(loaded.config)`."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        source_class = json.load(f)["_class_name"]
    loaded = getattr(diffusers, source_class).from_pretrained(folder, subfolder="scheduler")
    return getattr(diffusers, target_class).from_config(loaded.config, **overrides)


def model_tables(num_steps: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_steps, *SHAPE)).astype(np.float32)


def fake_model(x, t, i, tables):
    """A deterministic stand-in for the UNet: 0.1 x + sin(t / 100) + 0.5 R_i (numpy or jax)."""
    lib = jnp if isinstance(x, jax.Array) else np
    return (0.1 * x + lib.sin(t / 100.0) + 0.5 * tables[i]).astype(np.float32)


def diffusers_trajectory(scheduler, num_steps, eta, x_init, tables, noises, monkeypatch):
    """[initial latents, latents after each step], the model timesteps and init_noise_sigma."""
    scheduler.set_timesteps(num_steps)
    queue = list(noises)
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete,
        "randn_tensor",
        lambda *a, **k: torch.from_numpy(queue.pop(0)),
    )
    x = torch.from_numpy(x_init) * scheduler.init_noise_sigma
    trajectory = [x.numpy()]
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(fake_model(model_in.numpy(), float(t), i, tables))
        kwargs = {}
        if isinstance(scheduler, diffusers.DDIMScheduler) and eta > 0:
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noises[i])}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        trajectory.append(x.numpy())
    return np.stack(trajectory), scheduler.timesteps.numpy(), float(scheduler.init_noise_sigma)


def our_trajectory(sampler, x_init, tables, keys):
    """The same loop with our sampler, eagerly step by step."""
    x = jnp.asarray(x_init) * sampler.init_noise_sigma
    state = sampler.init_state(x)
    trajectory = [np.asarray(x)]
    for i in range(sampler.num_steps):
        model_in = sampler.scale_model_input(state, x, i)
        out = fake_model(np.asarray(model_in), float(sampler.timesteps[i]), i, tables)
        x, state = sampler.step(state, jnp.asarray(out), i, x, keys[i])
        trajectory.append(np.asarray(x))
    return np.stack(trajectory)


def trajectories(tmp_path, monkeypatch, variant, num_steps, config):
    """(sampler, our eager trajectory, diffusers' trajectory, inputs) after checking the grids.

    Fractional (Karras) timesteps agree to float32 rounding: torch's float32 sqrt is not
    correctly rounded on every CPU, numpy's is.
    """
    name, eta, target_class, overrides = SAMPLERS[variant]
    folder = write_pipeline(tmp_path, config)
    sampler = make_sampler(name, folder, num_steps, eta=eta)
    scheduler = reference_scheduler(folder, target_class, overrides)
    x_init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    tables = model_tables(num_steps)
    keys = jax.random.split(jax.random.key(3), num_steps)
    noises = [np.array(step_noise(k, jnp.zeros(SHAPE))) for k in keys]
    ref, ref_timesteps, ref_sigma = diffusers_trajectory(
        scheduler, num_steps, eta, x_init, tables, noises, monkeypatch
    )
    np.testing.assert_allclose(
        sampler.timesteps, ref_timesteps.astype(np.float32), rtol=1e-6, atol=0
    )
    assert sampler.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert np.isfinite(ref).all()
    ours = our_trajectory(sampler, x_init, tables, keys)
    return sampler, ours, ref, (x_init, tables, keys)


def compare(tmp_path, monkeypatch, variant, num_steps, config):
    """Max error of our whole trajectory relative to diffusers' largest latent, x_T included:
    with zero terminal SNR the first Euler step cancels x_T ~ 4096 N(0, I) down to ~70, so
    float32 rounding alone is ~1e-5 of the step's output there."""
    _, ours, ref, _ = trajectories(tmp_path, monkeypatch, variant, num_steps, config)
    return relative_error(ours, ref)


@pytest.mark.parametrize("variant", list(SAMPLERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "spacing,num_steps", [("leading", 10), ("leading", 25), ("trailing", 25), ("linspace", 10)]
)
def test_trajectory_matches_diffusers(
    tmp_path, monkeypatch, variant, prediction_type, spacing, num_steps
):
    config = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing)
    assert compare(tmp_path, monkeypatch, variant, num_steps, config) <= TOLERANCE


@pytest.mark.parametrize(
    "variant,num_steps,changes",
    [
        # the plain DDPM default config: linear betas, clip_sample=True, set_alpha_to_one=True
        (
            "ddim",
            10,
            {
                "_class_name": "DDPMScheduler",
                "beta_schedule": "linear",
                "clip_sample": True,
                "set_alpha_to_one": True,
                "steps_offset": 0,
            },
        ),
        ("ddim", 10, {"prediction_type": "sample"}),
        ("euler", 10, {"prediction_type": "sample"}),
        ("dpmpp_2m", 10, {"prediction_type": "sample"}),
        # zero terminal SNR with trailing timesteps (arXiv:2305.08891's recipe)
        (
            "ddim",
            10,
            {
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
                "prediction_type": "v_prediction",
                "set_alpha_to_one": True,
            },
        ),
        (
            "euler",
            10,
            {
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
                "prediction_type": "v_prediction",
            },
        ),
        (
            "euler_ancestral",
            10,
            {
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
                "prediction_type": "v_prediction",
            },
        ),
        (
            "dpmpp_2m",
            10,
            {
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
                "prediction_type": "v_prediction",
            },
        ),
        # an SDXL-style Euler config asking for Karras sigmas, read by euler and dpmpp_2m
        (
            "euler",
            25,
            {
                "_class_name": "EulerDiscreteScheduler",
                "use_karras_sigmas": True,
                "timestep_spacing": "leading",
                "sigma_max": 10.0,
            },
        ),
        ("dpmpp_2m", 25, {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}),
        # DPM-Solver options that change which steps are second order, and cosine betas
        (
            "dpmpp_2m",
            25,
            {"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "sigma_min"},
        ),
        (
            "dpmpp_2m",
            10,
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "final_sigmas_type": "sigma_min",
                "lower_order_final": False,
                "lambda_min_clipped": -5.1,
            },
        ),
        (
            "dpmpp_2m",
            25,
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "euler_at_final": True,
                "final_sigmas_type": "sigma_min",
            },
        ),
        ("dpmpp_2m_karras", 10, {"beta_schedule": "squaredcos_cap_v2", "sigma_max": 80.0}),
        ("euler_ancestral", 10, {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()}),
    ],
)
def test_config_variants_match_diffusers(tmp_path, monkeypatch, variant, num_steps, changes):
    assert compare(tmp_path, monkeypatch, variant, num_steps, {**SD, **changes}) <= TOLERANCE


@pytest.mark.parametrize("variant", list(SAMPLERS))
def test_jitted_fori_loop_equals_python_loop(tmp_path, monkeypatch, variant):
    config = dict(SD, prediction_type="v_prediction")
    sampler, ours, ref, (x_init, tables, keys) = trajectories(
        tmp_path, monkeypatch, variant, 10, config
    )
    tables = jnp.asarray(tables)

    @jax.jit
    def run(sampler, x, keys):
        def body(i, carry):
            x, state = carry
            out = fake_model(
                sampler.scale_model_input(state, x, i), sampler.timesteps[i], i, tables
            )
            return sampler.step(state, out, i, x, keys[i])

        x = x * sampler.init_noise_sigma
        return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))[0]

    final = run(sampler, jnp.asarray(x_init), keys)
    assert relative_error(final, ours[-1]) <= 1e-6
    assert relative_error(final, ref[-1]) <= TOLERANCE


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_training_tables_match_diffusers(tmp_path, schedule, rescale):
    config = dict(SD, beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    folder = write_pipeline(tmp_path, config)
    ours = ddpm_schedule(folder)
    ref = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ours.betas.dtype == jnp.float32 and ours.num_train_timesteps == 1000
    # Zero-SNR rescaling is ill-conditioned in float32 near t = T: diffusers' own betas are up
    # to 7e-6 away from the float64 values there, so rescaled tables are compared absolutely.
    atol = 1e-5 if rescale else 0
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=3e-6, atol=atol)
    np.testing.assert_allclose(
        ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=3e-6, atol=atol / 10
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noising_and_targets_match_diffusers(tmp_path, prediction_type):
    folder = write_pipeline(tmp_path, dict(SD, prediction_type=prediction_type))
    schedule = ddpm_schedule(os.path.join(folder, "scheduler"))
    ref = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(2))
    t = np.array([0, 17, 500, 999], np.int32)
    x0_t, noise_t, t_t = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long()
    noisy = jax.jit(add_noise)(schedule, x0, noise, t)
    assert noisy.shape == x0.shape and noisy.dtype == jnp.float32
    assert relative_error(noisy, ref.add_noise(x0_t, noise_t, t_t).numpy()) <= 1e-6
    assert (
        relative_error(
            velocity(schedule, x0, noise, t), ref.get_velocity(x0_t, noise_t, t_t).numpy()
        )
        <= 1e-6
    )
    expected = {
        "epsilon": noise,
        "v_prediction": np.asarray(velocity(schedule, x0, noise, t)),
        "sample": x0,
    }
    np.testing.assert_array_equal(target(schedule, x0, noise, t), expected[prediction_type])


@pytest.mark.parametrize(
    "defaults,cls",
    [
        (ddpm.DEFAULTS, diffusers.DDPMScheduler),
        (ddim.DEFAULTS, diffusers.DDIMScheduler),
        (euler.DEFAULTS, diffusers.EulerDiscreteScheduler),
        (euler.ANCESTRAL_DEFAULTS, diffusers.EulerAncestralDiscreteScheduler),
        (dpm_solver.DEFAULTS, diffusers.DPMSolverMultistepScheduler),
    ],
)
def test_defaults_are_diffusers_defaults(defaults, cls):
    signature = inspect.signature(cls.__init__).parameters
    assert {k: signature[k].default for k in defaults} == defaults


def test_pipeline_and_scheduler_folders_read_alike(tmp_path):
    folder = write_pipeline(tmp_path, SD)
    a = read_scheduler_config(folder)
    b = read_scheduler_config(os.path.join(folder, "scheduler"))
    assert a.values == b.values and a.class_name == "PNDMScheduler"


@pytest.mark.parametrize(
    "name,changes,num_steps,eta,words",
    [
        ("heun", {}, 10, 0.0, ["heun", *SAMPLER_NAMES]),
        ("ddim", {"beta_schedule": "sigmoid"}, 10, 0.0, ["beta_schedule", "sigmoid"]),
        (
            "euler",
            {"prediction_type": "flow_prediction"},
            10,
            0.0,
            ["prediction_type", "flow_prediction"],
        ),
        ("ddim", {"timestep_spacing": "uniform"}, 10, 0.0, ["timestep_spacing", "uniform"]),
        ("ddim", {"_class_name": "LCMScheduler"}, 10, 0.0, ["_class_name", "LCMScheduler"]),
        ("euler_ancestral", {"prediction_type": "sample"}, 10, 0.0, ["prediction_type", "sample"]),
        (
            "euler",
            {"interpolation_type": "log_linear"},
            10,
            0.0,
            ["interpolation_type", "log_linear"],
        ),
        ("dpmpp_2m", {"use_lu_lambdas": True}, 10, 0.0, ["use_lu_lambdas"]),
        ("ddim", {"thresholding": True}, 10, 0.0, ["thresholding"]),
        ("ddim", {"steps_offset": 100}, 10, 0.0, ["steps_offset"]),
        ("ddim", {"trained_betas": [0.1, 0.2]}, 10, 0.0, ["trained_betas"]),
        ("ddim", {"num_train_timesteps": "1000"}, 10, 0.0, ["num_train_timesteps", "'1000'"]),
        ("ddim", {}, 0, 0.0, ["num_steps=0"]),
        ("euler", {}, 10, 0.5, ["eta", "ddim"]),
        ("ddim", {}, 10, -1.0, ["eta=-1.0"]),
    ],
)
def test_unsupported_input_is_a_user_error(tmp_path, name, changes, num_steps, eta, words):
    folder = write_pipeline(tmp_path, {**SD, **changes})
    with pytest.raises(UserError) as error:
        make_sampler(name, folder, num_steps, eta=eta)
    for word in words:
        assert word in str(error.value)


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"scheduler_config\.json"):
        ddpm_schedule(str(tmp_path))
