"""PNDM (PLMS, skip_prk_steps) against diffusers' PNDMScheduler step by step, and sampler
"pipeline" (the class scheduler_config.json names)."""

import inspect
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from safealign_jax import UserError
from safealign_jax.schedulers import (
    PIPELINE_SAMPLERS,
    SAMPLER_NAMES,
    DDIMSampler,
    DPMSolverSampler,
    EulerSampler,
    PNDMSampler,
    make_sampler,
    pndm,
    scheduler_config_from_dict,
)

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 8, 8, 4)


def write_scheduler(tmp_path, config: dict):
    folder = tmp_path / "scheduler"
    folder.mkdir(exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def outputs(num_calls: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_calls, *SHAPE)).astype(np.float32)


def model(x, t, i, table):
    """Random outputs that also depend on x and t (so a wrong sample or timestep shows)."""
    lib = jnp if isinstance(x, jax.Array) else np
    return (0.1 * x + lib.sin(t / 300.0) + table[i]).astype(np.float32)


def reference(folder, num_steps, x_init, table):
    """diffusers' latents after every call, and its timesteps."""
    scheduler = diffusers.PNDMScheduler.from_pretrained(folder)
    scheduler.set_timesteps(num_steps)
    x, after = torch.from_numpy(x_init), []
    for i, t in enumerate(scheduler.timesteps):
        out = torch.from_numpy(model(scheduler.scale_model_input(x, t).numpy(), float(t), i, table))
        x = scheduler.step(out, t, x).prev_sample
        after.append(x.numpy())
    return np.stack(after), scheduler.timesteps.numpy()


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 50])
@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_every_step_matches_diffusers(tmp_path, prediction_type, spacing, num_steps, alpha_to_one):
    config = dict(SD15, prediction_type=prediction_type, timestep_spacing=spacing,
                  set_alpha_to_one=alpha_to_one)
    folder = write_scheduler(tmp_path, config)
    sampler = make_sampler("pndm", str(folder), num_steps)
    assert isinstance(sampler, PNDMSampler) and sampler.init_noise_sigma == 1.0
    table = outputs(sampler.num_steps)
    x_init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref, ref_timesteps = reference(folder, num_steps, x_init, table)
    np.testing.assert_array_equal(sampler.timesteps, ref_timesteps.astype(np.float32))
    assert sampler.num_steps == (1 if num_steps == 1 else num_steps + 1)
    x, state = jnp.asarray(x_init), sampler.init_state(jnp.asarray(x_init))
    for i in range(sampler.num_steps):
        assert np.array_equal(sampler.scale_model_input(state, x, i), x)
        out = model(np.asarray(x), float(sampler.timesteps[i]), i, table)
        x, state = sampler.step(state, jnp.asarray(out), i, x, None)
        assert relative(x, ref[i]) <= 1e-5, (i, relative(x, ref[i]))


def test_sd15_timesteps_are_diffusers_51_calls():
    """SD1.5's 50 steps: 51 UNet calls, 951 repeated after 971 ... 1 (steps_offset 1)."""
    sampler = make_sampler("pndm", scheduler_config_from_dict(SD15), 50)
    t = np.asarray(sampler.timesteps).astype(int)
    assert t.shape == (51,) and list(t[:4]) == [981, 961, 961, 941] and t[-1] == 1
    # call 1 restarts from call 0's latents and averages the two outputs; it is not kept
    assert list(np.asarray(sampler.restart[:3])) == [0, 1, 0]
    assert list(np.asarray(sampler.keep[:3])) == [1, 0, 1]
    np.testing.assert_allclose(sampler.weights[1], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(sampler.weights[2], [1.5, -0.5, 0, 0])
    np.testing.assert_allclose(sampler.weights[3], [23 / 12, -16 / 12, 5 / 12, 0])
    np.testing.assert_allclose(sampler.weights[50], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def test_jitted_loop_with_per_image_state_equals_eager(tmp_path):
    """The pipeline's loop: jitted fori_loop, step vmapped per image with the state's batch
    axis dropped (see pipeline._denoise)."""
    folder = write_scheduler(tmp_path, dict(SD15, prediction_type="v_prediction"))
    sampler = make_sampler("pndm", str(folder), 10)
    table = jnp.asarray(outputs(sampler.num_steps))
    x_init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref, _ = reference(folder, 10, x_init, np.asarray(table))

    @jax.jit
    def run(sampler, x):
        def body(i, carry):
            x, state = carry
            out = model(x, sampler.timesteps[i], i, table)
            step = lambda s, o, xi: sampler.step(s, o[None], i, xi[None], None)  # noqa: E731
            return jax.vmap(lambda s, o, xi: jax.tree.map(lambda a: a[0], step(s, o, xi)))(state, out, x)

        state = jax.vmap(lambda xi: jax.tree.map(lambda a: a[0], sampler.init_state(xi[None])))(x)
        return jax.lax.fori_loop(0, sampler.num_steps, body, (x, state))[0]

    assert relative(run(sampler, jnp.asarray(x_init)), ref[-1]) <= 1e-5


def test_defaults_are_diffusers_defaults():
    signature = inspect.signature(diffusers.PNDMScheduler.__init__).parameters
    assert {k: signature[k].default for k in pndm.DEFAULTS} == pndm.DEFAULTS


@pytest.mark.parametrize("class_name, changes, expected", [
    ("PNDMScheduler", {}, PNDMSampler),
    ("DDIMScheduler", {}, DDIMSampler),
    ("EulerDiscreteScheduler", {}, EulerSampler),
    ("EulerAncestralDiscreteScheduler", {}, None),
    ("DPMSolverMultistepScheduler", {}, DPMSolverSampler),
])
def test_pipeline_sampler_is_the_class_the_config_names(tmp_path, class_name, changes, expected):
    config = scheduler_config_from_dict({**SD15, "_class_name": class_name, **changes})
    sampler = make_sampler("pipeline", config, 10)
    same = make_sampler(PIPELINE_SAMPLERS[class_name], config, 10)
    assert type(sampler) is type(same)
    if expected is not None:
        assert isinstance(sampler, expected)
    np.testing.assert_array_equal(sampler.timesteps, same.timesteps)
    assert "pipeline" in SAMPLER_NAMES and "pndm" in SAMPLER_NAMES


@pytest.mark.parametrize("name, changes, words", [
    ("pipeline", {"_class_name": "DDPMScheduler"}, [
        "_class_name='DDPMScheduler'", "PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler", "pndm, ddim"]),
    ("pipeline", {"_class_name": "LMSDiscreteScheduler"}, ["'LMSDiscreteScheduler'", "supported"]),
    ("pndm", {"skip_prk_steps": False}, ["skip_prk_steps=False", "True"]),
    ("pndm", {"prediction_type": "sample"}, ["prediction_type='sample'"]),
    ("pndm", {"steps_offset": 30}, ["steps_offset=30"]),
])
def test_unsupported_configs_are_one_line_user_errors(name, changes, words):
    with pytest.raises(UserError) as error:
        make_sampler(name, scheduler_config_from_dict({**SD15, **changes}), 50)
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_eta_follows_the_resolved_sampler():
    pndm_config = scheduler_config_from_dict(SD15)
    with pytest.raises(UserError, match=r"eta=0\.5 applies only to the ddim sampler, not to pndm"):
        make_sampler("pipeline", pndm_config, 10, eta=0.5)
    ddim_config = scheduler_config_from_dict({**SD15, "_class_name": "DDIMScheduler"})
    assert make_sampler("pipeline", ddim_config, 10, eta=0.5).stochastic
