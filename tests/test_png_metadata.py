"""PNG text chunks (prompt, seed, steps, guidance, sampler, model; A1111 "parameters"), the image
size in the manifest, and labelled grids."""

import json

import numpy as np
import pytest
from PIL import Image
from pipelines import build_sd

from safealign_jax import UserError
from safealign_jax.data.eval_prompts import PromptRow
from safealign_jax.eval import generation
from safealign_jax.images import contact_sheet, labelled_grid, save_png


def test_save_png_writes_text_chunks(tmp_path):
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    text = {"prompt": "a cat, ünïcode", "seed": "7", "parameters": "a cat\nSteps: 2"}
    save_png(image, str(tmp_path / "a.png"), text)
    with Image.open(tmp_path / "a.png") as png:
        assert png.text == text
        np.testing.assert_array_equal(np.asarray(png), image)


def test_png_text_is_a1111_parameters():
    settings = generation.GenerationSettings(steps=30, guidance=7.5, negative_prompt="blurry, lowres")
    text = generation.png_text("a red star", 1234, settings, "euler_ancestral", "sd15 + safe", 512, 768)
    assert text["parameters"] == ("a red star\nNegative prompt: blurry, lowres\n"
                                  "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 768x512, Model: sd15 + safe")
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "size", "model")} == {
        "prompt": "a red star", "negative_prompt": "blurry, lowres", "seed": "1234", "steps": "30", "guidance": "7.5",
        "sampler": "euler_ancestral", "size": "768x512", "model": "sd15 + safe"}
    plain = generation.png_text("a cat", 3, generation.GenerationSettings(steps=2, guidance=4.0), "ddim", "sd", 64, 64)
    assert plain["parameters"] == "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 4, Seed: 3, Size: 64x64, Model: sd"


def test_generated_pngs_and_manifest_carry_the_settings(tmp_path):
    pipeline = build_sd(tmp_path)
    model = generation.load_model(pipeline)
    rows = [PromptRow(index=0, id="0", prompt="the cat"), PromptRow(index=1, id="1", prompt="a dog")]
    settings = generation.GenerationSettings(steps=1, sampler="pipeline", guidance=3.0, negative_prompt="ugly",
                                             batch_size=2, seed=40)
    generation.generate_run(model, rows, str(tmp_path / "run"), settings, progress=False)
    records = generation.read_manifest(str(tmp_path / "run"))
    for row, record in zip(rows, records, strict=True):
        with Image.open(tmp_path / "run" / "images" / record["file"]) as png:
            width, height = png.size
            text = dict(png.text)
        assert (record["height"], record["width"]) == (height, width) and height > 0
        assert text["prompt"] == row.prompt and text["seed"] == str(40 + row.index)
        assert (text["negative_prompt"], text["steps"], text["guidance"]) == ("ugly", "1", "3")
        assert text["sampler"] == "ddim" and text["model"] == "sd"  # "pipeline" resolved: the DDIM scheduler
        assert text["parameters"] == (f"{row.prompt}\nNegative prompt: ugly\nSteps: 1, Sampler: DDIM, CFG scale: 3, "
                                      f"Seed: {40 + row.index}, Size: {width}x{height}, Model: sd")
    assert json.loads((tmp_path / "run" / "manifest.jsonl").read_text().splitlines()[0])["width"] == records[0]["width"]


def test_labelled_grid_puts_labels_around_the_sheet():
    rng = np.random.default_rng(0)
    tiles = [rng.integers(100, 200, (10, 12, 3), dtype=np.uint8) for _ in range(6)]
    grid = labelled_grid(tiles, ["first row", "second row"], ["a", "b", "c"], pad=2)
    body = contact_sheet(tiles, columns=3, pad=2)
    top, left = grid.shape[0] - body.shape[0], grid.shape[1] - body.shape[1]
    assert top > 0 and left > 0
    np.testing.assert_array_equal(grid[top:, left:], body)  # the sheet itself is untouched
    header, margin = grid[:top, left:], grid[top:, :left]
    for c in range(3):  # some dark (text) pixels above every column, none elsewhere in white space
        assert (header[:, 2 + c * 14: 2 + c * 14 + 12] < 100).any()
    for r in range(2):
        assert (margin[2 + r * 12: 2 + r * 12 + 10] < 100).any()
    assert grid[:top, :left].min() == 255  # the corner stays blank
    with pytest.raises(UserError, match="5 images for 2 rows x 3 columns"):
        labelled_grid(tiles[:5], ["1", "2"], ["a", "b", "c"])
