"""CLIP image and text features from a local transformers CLIP folder (Q16, CLIPScore, FD-CLIP).

Images are uint8 arrays (B, H, W, 3) in RGB. Preprocessing is OpenAI CLIP's: resize the shorter
side to the model resolution with PIL bicubic, centre crop, scale to [0, 1], normalise with the
folder's `preprocessor_config.json` mean/std (OpenAI's values when absent). torch and transformers
are imported inside functions only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from safealign_jax.errors import UserError, check

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def as_images(images, what: str = "images") -> np.ndarray:
    """`images` as a uint8 array (B, H, W, 3); raises UserError on other shapes or dtypes."""
    images = np.asarray(images)
    check(
        images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8,
        f"{what}: expected uint8 RGB images of shape (B, H, W, 3), got {images.dtype} {images.shape}.",
    )
    return images


def require_folder(folder, what: str, provide: str) -> Path:
    """`folder` as a Path if it holds a config.json; else UserError saying what to put there."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{what} folder {path} has no config.json: provide {provide} there.")
    return path


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """One uint8 (H, W, 3) image -> (size, size, 3): shorter side to `size` (bicubic), centre crop."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    scaled = (size, int(size * long / short))
    new_h, new_w = scaled if height <= width else scaled[::-1]
    pil = Image.fromarray(image)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return np.asarray(pil)[top : top + size, left : left + size]


def preprocess(images, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, size, size) normalised pixel values for CLIP."""
    images = as_images(images)
    crops = np.stack([resize_and_crop(image, size) for image in images]).astype(np.float32) / 255.0
    crops = (crops - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ClipEncoder:
    """A transformers `CLIPModel` (or vision-only `CLIPVisionModelWithProjection`) from a folder.

    `image_features` / `text_features` return the projected embeddings (B, projection_dim),
    float32, not normalised. Batches of `batch_size` run on torch `device`.
    """

    def __init__(self, model, tokenizer, size: int, mean, std, device: str, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.size, self.mean, self.std = size, mean, std
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_folder(
        cls, folder, *, text: bool = True, device: str = "cpu", batch_size: int = 32,
        what: str = "CLIP model", provide: str = "a transformers CLIP checkpoint (save_pretrained)",
    ) -> ClipEncoder:
        """Loads weights (and the tokenizer when `text`) from `folder`; nothing is downloaded."""
        path = require_folder(folder, what, provide)
        from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

        model_class = CLIPModel if text else CLIPVisionModelWithProjection
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            if not text:  # the vision tower of a full CLIP folder, with the model's projection size
                projection_dim = getattr(config, "projection_dim", None)
                config = getattr(config, "vision_config", config)
                config.projection_dim = projection_dim or config.projection_dim
            model = model_class.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"{what} folder {path}: cannot load {model_class.__name__} ({error}).") from error
        tokenizer = None
        if text:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as error:
                raise UserError(
                    f"{what} folder {path}: no CLIP tokenizer files (vocab.json, merges.txt) ({error})."
                ) from error
        size = (model.config.vision_config if text else model.config).image_size
        mean, std = OPENAI_MEAN, OPENAI_STD
        processor_file = path / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            mean = tuple(processor.get("image_mean", mean))
            std = tuple(processor.get("image_std", std))
        model = model.eval().to(device)
        return cls(model, tokenizer, size, mean, std, device, batch_size)

    @property
    def dim(self) -> int:
        """Size of the projected embedding."""
        return self.model.config.projection_dim

    def image_features(self, images) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float32 (B, projection_dim)."""
        import torch

        images = as_images(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess(images[start : start + self.batch_size], self.size, self.mean, self.std)
            with torch.no_grad():
                pixels = torch.from_numpy(pixels).to(self.device)
                if hasattr(self.model, "visual_projection") and hasattr(self.model, "text_model"):
                    pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                    embeds = self.model.visual_projection(pooled)
                else:
                    embeds = self.model(pixel_values=pixels).image_embeds
            out.append(embeds.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def text_features(self, texts) -> np.ndarray:
        """list of B strings -> float32 (B, projection_dim); long texts truncated to the context."""
        import torch

        check(self.tokenizer is not None, "this CLIP encoder was loaded without its text tower.")
        texts = list(texts)
        length = self.model.config.text_config.max_position_embeddings
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size], padding="max_length", truncation=True,
                max_length=length, return_tensors="pt",
            )
            with torch.no_grad():
                pooled = self.model.text_model(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                ).pooler_output
                out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
