"""Image preprocessing of the official training scripts, in numpy: decode, resize the shorter
side to `size` (bilinear), centre crop to `size` x `size`, scale to [-1, 1]; and horizontal flips.
Arrays are HWC (the NHWC layout of the models without the batch axis)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> float32 (size, size, 3) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        width, height = image.size
        short = min(width, height)
        # torchvision Resize(int): the shorter side becomes `size`, the longer one is truncated.
        new = (size, int(size * height / width)) if width == short else (int(size * width / height), size)
        if new != image.size:
            image = image.resize(new, Image.BILINEAR)
        left = round((new[0] - size) / 2.0)
        top = round((new[1] - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32)
    return pixels / 127.5 - 1.0


def hflip(array: np.ndarray) -> np.ndarray:
    """Mirror an HWC image or latent left-right."""
    return np.ascontiguousarray(array[:, ::-1])
