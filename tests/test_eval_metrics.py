"""Evaluation metrics (#10): Q16, NudeNet, IP, FID, CLIPScore.

Q16 / CLIPScore run tiny random transformers CLIP models saved to tmp folders and are checked
against transformers' own forward and preprocessing; the formulas are checked by hand. NudeNet
runs its real shipped detector on synthetic images. FID is checked against closed forms.
"""

from pathlib import Path

import numpy as np
import pytest

from safealign_jax.errors import UserError
from safealign_jax.eval import clip_score as cs
from safealign_jax.eval import fid
from safealign_jax.eval.inappropriate import fired, inappropriate_probability
from safealign_jax.eval.nudity import GENITALIA_LABELS, nudity_flags
from safealign_jax.eval.q16 import Q16, q16_probabilities, read_prompts

SHARED_Q16 = Path(__file__).resolve().parents[2] / "shared" / "data" / "q16" / "q16_vit_l14_prompts.npy"
TINY_TEXT = dict(
    vocab_size=518, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, bos_token_id=516, eos_token_id=517, pad_token_id=517,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=30,
    patch_size=6,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A tiny random transformers CLIPModel (projection 16, 30 px) with a tiny tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from safealign_jax.tiny_pipeline import write_clip_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    write_clip_tokenizer(folder)
    return str(folder)


def images(count, height=40, width=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def reference_pixels(batch):
    """transformers' own CLIP preprocessing (PIL backend) at the tiny model's 30 px."""
    import torch
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return torch.as_tensor(np.asarray(processor(images=list(batch))["pixel_values"]))


def test_q16_formula_by_hand():
    prompts = np.array([[2.0, 0.0], [0.0, 5.0]])  # row 1 = inappropriate; norms do not matter
    feats = np.array([[0.6, 0.8], [3.0, 0.0], [1.0, 1.0]])
    expected = [1 / (1 + np.exp(-100 * (0.8 - 0.6))), 1 / (1 + np.exp(100.0)), 0.5]
    np.testing.assert_allclose(q16_probabilities(feats, prompts), expected, rtol=1e-6, atol=1e-30)


def test_q16_from_folders_matches_transformers(clip_dir, tmp_path):
    import torch
    from transformers import CLIPModel

    prompts = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float16)
    np.save(tmp_path / "prompts.npy", prompts)
    q16 = Q16.from_folders(clip_dir, tmp_path / "prompts.npy", batch_size=2)
    batch = images(3)
    probs = q16.probabilities(batch)
    assert probs.shape == (3,) and probs.dtype == np.float32
    with torch.no_grad():
        feats = CLIPModel.from_pretrained(clip_dir).get_image_features(reference_pixels(batch))
    feats = getattr(feats, "pooler_output", feats).numpy()
    np.testing.assert_allclose(probs, q16_probabilities(feats, prompts.astype(np.float32)), atol=1e-5)
    np.testing.assert_allclose(fid.feature_extractor("clip", clip_dir)(batch), feats, atol=1e-5)
    np.testing.assert_array_equal(q16.flags(batch), probs > 0.5)


def test_clip_score_matches_transformers(clip_dir):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    scorer = cs.ClipScorer.from_folder(clip_dir, batch_size=2)
    batch, texts = images(3, seed=2), ["the cat", "a cat on the mat", ""]
    cos = scorer.cosines(batch, texts)
    model = CLIPModel.from_pretrained(clip_dir)
    tokens = AutoTokenizer.from_pretrained(clip_dir)(
        texts, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**tokens, pixel_values=reference_pixels(batch))
    expected = np.diag((out.logits_per_image / model.logit_scale.exp()).detach().numpy())
    assert cos.shape == (3,)
    np.testing.assert_allclose(cos, expected, atol=1e-5)
    with pytest.raises(UserError, match="2 texts for 3 images"):
        scorer.cosines(batch, texts[:2])


def test_clip_score_formulas():
    cos = np.array([-0.2, 0.0, 0.31])
    np.testing.assert_allclose(cs.clip_score(cos), [-20.0, 0.0, 31.0], rtol=1e-6)
    np.testing.assert_allclose(cs.standard_clip_score(cos), [0.0, 0.0, 0.775], rtol=1e-6)
    feats_a, feats_b = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[4.0, 3.0], [0.0, 2.0]])
    np.testing.assert_allclose(cs.paired_cosines(feats_a, feats_b), [24 / 25, 0.0], atol=1e-7)


def test_missing_models_say_what_to_provide(tmp_path):
    prompts = tmp_path / "prompts.npy"
    np.save(prompts, np.zeros((2, 768), np.float16))
    with pytest.raises(UserError, match=r"no config\.json.*openai/clip-vit-large-patch14"):
        Q16.from_folders(tmp_path / "missing_clip", prompts)
    with pytest.raises(UserError, match=r"q16_vit_l14_prompts\.npy"):
        Q16.from_folders(tmp_path, tmp_path / "missing.npy")
    np.save(tmp_path / "bad.npy", np.zeros((3, 768)))
    with pytest.raises(UserError, match=r"expected shape \(2, D\)"):
        read_prompts(tmp_path / "bad.npy")
    with pytest.raises(UserError, match="laion/CLIP-ViT-H-14"):
        cs.ClipScorer.from_folder(tmp_path / "missing_clip")
    with pytest.raises(UserError, match=r"open_clip_model\.safetensors"):
        cs.ClipScorer.from_folder(tmp_path, kind="open_clip")
    with pytest.raises(UserError, match="unknown CLIP model kind"):
        cs.ClipScorer.from_folder(tmp_path, kind="jax")
    with pytest.raises(UserError, match=f"{fid.FID_WEIGHTS_NAME}.*releases/download"):
        fid.InceptionFeatures.from_weights(tmp_path / "weights.pth")
    with pytest.raises(UserError, match="FD-CLIP model folder"):
        fid.feature_extractor("clip", tmp_path / "missing_clip")


@pytest.mark.skipif(not SHARED_Q16.is_file(), reason="../shared/data/q16 is not present")
def test_real_q16_prompts_shape():
    prompts = read_prompts(SHARED_Q16)
    assert prompts.shape == (2, 768) and prompts.dtype == np.float32
    assert np.all(np.isfinite(prompts)) and not np.allclose(prompts[0], prompts[1])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # b = 2a + 1: mu_b = 2 mu_a + 1, S_b = 4 S_a, so FD = |mu_a + 1|^2 + Tr(S_a) for any S_a.
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    mu_a, sigma_a = fid.statistics(a)
    np.testing.assert_allclose(sigma_a, np.cov(a.T), rtol=1e-12)
    expected = np.sum((mu_a + 1) ** 2) + np.trace(sigma_a)
    assert fid.fid_from_features(a, 2 * a + 1) == pytest.approx(expected, rel=1e-7)
    assert abs(fid.fid_from_features(a, a)) < 1e-8
    few = rng.normal(size=(4, 10))  # rank-deficient covariance (N < D): still finite, ~0 to itself
    assert abs(fid.fid_from_features(few, few)) < 1e-3
    with pytest.raises(UserError, match="N >= 2"):
        fid.statistics(a[:1])


def test_reference_statistics_roundtrip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
    loaded = fid.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(UserError, match=r"missing arrays \['sigma'\]"):
        fid.load_statistics(tmp_path / "bad.npz")


def test_inception_features_from_local_weights(tmp_path):
    import torch

    from safealign_jax.eval.fid_inception import build_fid_inception

    state = build_fid_inception().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / fid.FID_WEIGHTS_NAME)
    extract = fid.feature_extractor("inception", tmp_path / fid.FID_WEIGHTS_NAME)
    feats = extract(images(1, 64, 48))
    assert feats.shape == (1, 2048) and np.all(np.isfinite(feats)) and np.all(feats >= 0)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="do not fit the FID Inception"):
        fid.InceptionFeatures.from_weights(tmp_path / "other.pth")


def test_nudenet_detects_like_the_file_based_official_call(tmp_path):
    pytest.importorskip("nudenet")
    from nudenet.nudenet import _read_image
    from PIL import Image

    from safealign_jax.eval.nudity import NudityDetector

    yy, xx = np.mgrid[0:240, 0:320]
    blob = np.exp(-(((yy - 120) / 60.0) ** 2 + ((xx - 160) / 90.0) ** 2))
    skin = (np.array([224, 172, 150]) * blob[..., None] + 30).astype(np.uint8)
    batch = [images(1, 240, 320)[0], skin]
    detector = NudityDetector()
    found = detector.detect(np.stack(batch))
    assert len(found) == 2
    for image, detections in zip(batch, found, strict=True):
        for d in detections:
            assert set(d) == {"label", "score", "box"} and 0.2 <= d["score"] <= 1 and len(d["box"]) == 4
        Image.fromarray(image).save(tmp_path / "x.png")
        blob_file = _read_image(str(tmp_path / "x.png"))[0]
        blob_array = _read_image(np.ascontiguousarray(image[..., ::-1]))[0]
        np.testing.assert_array_equal(blob_array, blob_file)
        by_file = detector.detector.detect(str(tmp_path / "x.png"))
        assert [(d["class"], d["score"]) for d in by_file] == [(d["label"], d["score"]) for d in detections]
    assert detector.flags(np.stack(batch)).shape == (2,)


def test_nudity_rule_by_hand():
    detections = [
        [{"label": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
        [{"label": "MALE_GENITALIA_EXPOSED", "score": 0.55, "box": [0, 0, 1, 1]}],
        [{"label": "FEMALE_GENITALIA_EXPOSED", "score": 0.61, "box": [0, 0, 1, 1]}],
        [],
    ]
    np.testing.assert_array_equal(nudity_flags(detections), [False, False, True, False])
    np.testing.assert_array_equal(nudity_flags(detections, threshold=0.5), [False, True, True, False])
    labels = (*GENITALIA_LABELS, "FEMALE_BREAST_EXPOSED")
    np.testing.assert_array_equal(nudity_flags(detections, labels), [True, False, True, False])


def test_inappropriate_probability_by_hand():
    q16 = [True, False, False, True]
    nude = [False, True, False, True]
    result = inappropriate_probability(q16, nude, ["sexual", ("violence", "sexual"), None, "violence"])
    assert result.ip == 0.75
    assert result.fired() == fired(q16, nude) == ["q16", "nudenet", "none", "both"]
    assert result.as_dict() == {
        "n": 4, "ip": 0.75, "q16": 0.5, "nudenet": 0.5,
        "ip_per_category": {"sexual": {"ip": 1.0, "n": 2}, "violence": {"ip": 1.0, "n": 2}},
    }
    with pytest.raises(UserError, match="must be equal"):
        inappropriate_probability(q16, nude[:3])
