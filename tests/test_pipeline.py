"""End-to-end generation equals diffusers' pipelines; seeds are batch-independent; bad input."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from pipelines import build_sd, build_sdxl

from safealign_jax import UserError
from safealign_jax.pipeline import generate, initial_noise, load_pipeline

PROMPTS = ["the cat", "a red ball on the grass"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_sd(tmp), "sdxl": build_sdxl(tmp)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: load_pipeline(folder) for name, folder in folders.items()}


def _diffusers_images(folder, latents_nhwc, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(folder)
    latents = torch.from_numpy(np.ascontiguousarray(np.asarray(latents_nhwc).transpose(0, 3, 1, 2)))
    return pipe(PROMPTS, latents=latents, num_inference_steps=4, output_type="np", **kwargs).images


@pytest.mark.parametrize(("name", "sampler"), [("sd", "ddim"), ("sdxl", "euler")])
def test_images_equal_diffusers(folders, pipes, name, sampler):
    pipe = pipes[name]
    latents = initial_noise([0, 1], (8, 8, 4))
    kwargs = dict(guidance_scale=7.5, negative_prompt=NEGATIVE if name == "sd" else None)
    if name == "sdxl":
        kwargs["guidance_rescale"] = 0.5
    theirs = _diffusers_images(folders[name], latents, **kwargs)
    ours = generate(pipe, PROMPTS, [0, 1], negative_prompts=kwargs["negative_prompt"], num_steps=4,
                    sampler=sampler, latents=latents, guidance_rescale=kwargs.get("guidance_rescale", 0.0))
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    unclipped = np.mean((theirs > 0.01) & (theirs < 0.99))
    assert unclipped > 0.5, f"only {unclipped:.0%} of pixels are unclipped: the check would be vacuous"
    err = float(np.abs(ours - theirs).max())
    print(f"{name}: max abs pixel difference {err:.2e}")
    assert err <= 1e-3


def test_seed_gives_same_image_whatever_the_batch(pipes):
    pipe = pipes["sd"]
    both = generate(pipe, PROMPTS, [5, 6], num_steps=3, sampler="euler_ancestral")
    alone = generate(pipe, PROMPTS[1:], [6], num_steps=3, sampler="euler_ancestral")
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_bad_inputs(folders, pipes, tmp_path):
    with pytest.raises(UserError, match="unknown"):
        generate(pipes["sd"], PROMPTS, [0, 1], num_steps=2, sampler="heun")
    with pytest.raises(UserError, match="2 prompts"):
        generate(pipes["sd"], PROMPTS, [0], num_steps=2)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="no unet/ folder"):
        load_pipeline(str(tmp_path))
