"""CLIPScore: cosine between the CLIP embeddings of an image and its prompt.

Reported two ways: the SafetyDPO/PSA papers' `clip_score` = 100 x cosine (open_clip ViT-H-14,
laion2b_s32b_b79k) and the standard CLIPScore (Hessel et al.) `standard_clip_score` =
2.5 x max(cosine, 0). Both are averaged over the images by the caller.
Models: kind="transformers" reads a transformers CLIP folder (the same ViT-H-14 weights are
published in that format as laion/CLIP-ViT-H-14-laion2B-s32B-b79K); kind="open_clip" reads a
folder with open_clip's `open_clip_model.safetensors` or `open_clip_pytorch_model.bin` and needs
`open_clip_torch` installed (not an extra: its torchvision dependency does not match CPU torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from safealign_jax.errors import UserError, check
from safealign_jax.eval.clip_model import ClipEncoder, as_images, l2_normalize

CLIP_KINDS = ("transformers", "open_clip")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
DEFAULT_OPEN_CLIP_MODEL = "ViT-H-14"


def clip_score(cosines) -> np.ndarray:
    """The papers' CLIPScore: 100 x cosine, per image."""
    return 100.0 * np.asarray(cosines, np.float32)


def standard_clip_score(cosines, weight: float = 2.5) -> np.ndarray:
    """Hessel et al.'s CLIPScore: weight x max(cosine, 0), per image."""
    return weight * np.maximum(np.asarray(cosines, np.float32), 0.0)


def paired_cosines(image_features, text_features) -> np.ndarray:
    """(B, D), (B, D) -> (B,) cosine of each image with its own text."""
    return np.sum(l2_normalize(image_features) * l2_normalize(text_features), axis=-1)


class ClipScorer:
    """Embeds uint8 RGB images (B, H, W, 3) and texts with one CLIP model."""

    def __init__(self, image_features: Callable, text_features: Callable):
        self.image_features, self.text_features = image_features, text_features

    @classmethod
    def from_folder(
        cls, path, kind: str = "transformers", *, model_name: str = DEFAULT_OPEN_CLIP_MODEL,
        device: str = "cpu", batch_size: int = 32,
    ) -> ClipScorer:
        """A CLIP model from a local folder; `model_name` is open_clip's architecture name."""
        if kind == "transformers":
            encoder = ClipEncoder.from_folder(
                path, device=device, batch_size=batch_size, what="CLIPScore model",
                provide="a transformers CLIP checkpoint with its tokenizer (e.g. the hub repo "
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
            )
            return cls(encoder.image_features, encoder.text_features)
        if kind == "open_clip":
            return cls(*_open_clip_encoders(Path(path), model_name, device, batch_size))
        raise UserError(f"unknown CLIP model kind {kind!r}; expected one of {', '.join(CLIP_KINDS)}.")

    def cosines(self, images, texts: Sequence[str]) -> np.ndarray:
        """(B,) cosine between image i and text i."""
        images = as_images(images, "CLIPScore images")
        check(len(texts) == len(images), f"CLIPScore: {len(texts)} texts for {len(images)} images.")
        return paired_cosines(self.image_features(images), self.text_features(list(texts)))


def _open_clip_encoders(folder: Path, model_name, device: str, batch_size: int):
    """(image_features, text_features) functions of an open_clip model stored in `folder`."""
    weights = next((folder / f for f in OPEN_CLIP_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise UserError(
            f"open_clip folder {folder} has none of {', '.join(OPEN_CLIP_FILES)}: provide the "
            "open_clip weights (e.g. hub repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K) there."
        )
    try:
        import open_clip
        import torch
    except ImportError as error:
        raise UserError(
            "kind='open_clip' needs open_clip_torch (pip install open_clip_torch with a torchvision "
            "matching your torch); or use kind='transformers' with the same weights."
        ) from error
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    model = model.eval().to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    from PIL import Image

    def image_features(images):
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([transform(Image.fromarray(im)) for im in images[start : start + batch_size]])
            with torch.no_grad():
                out.append(model.encode_image(pixels.to(device)).float().cpu().numpy())
        return np.concatenate(out)

    def text_features(texts):
        out = []
        for start in range(0, len(texts), batch_size):
            with torch.no_grad():
                tokens = tokenizer(texts[start : start + batch_size]).to(device)
                out.append(model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out)

    return image_features, text_features
