"""Writing images: atomic PNG files and contact sheets."""

import math
import os
import tempfile

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    """Writes (H, W, 3) float [0, 1] or uint8 as PNG atomically (temporary file, then rename)."""
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def contact_sheet(images: list[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """A grid of equally sized (H, W, 3) uint8 images on a white background."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w, _ = images[0].shape
    sheet = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    return sheet
