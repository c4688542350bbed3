"""Writing images: atomic PNG files (with text chunks), contact sheets and labelled grids."""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from safealign_jax.convert.files import atomic_path
from safealign_jax.errors import check


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str, text: dict[str, str] | None = None) -> None:
    """Writes (H, W, 3) float [0, 1] or uint8 as PNG atomically (`convert.files.atomic_path`).

    `text`: text chunks (key -> value; iTXt, so any Unicode), read back as `Image.open(path).text`.
    """
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))
    with atomic_path(path, ".png.tmp") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)


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


def labelled_grid(images: list[np.ndarray], row_labels: list[str], column_labels: list[str],
                  pad: int = 2) -> np.ndarray:
    """A contact sheet of len(row_labels) x len(column_labels) equally sized (H, W, 3) uint8
    `images` (row-major) with the column labels above it and the row labels left of it, black on
    white in PIL's default font; a label wider than its space is cut and ends in "...".
    """
    check(len(images) == len(row_labels) * len(column_labels),
          f"labelled_grid: {len(images)} images for {len(row_labels)} rows x {len(column_labels)} columns.")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = measure.textbbox((0, 0), "Ag", font=font)[3] + 2 * pad
    h, w, _ = images[0].shape

    def fit(label: str, width: int) -> str:
        while label and measure.textlength(label, font=font) > width:
            label = label[:-4] + "..." if len(label) > 4 else ""
        return label

    margin = min(max(int(measure.textlength(t, font=font)) for t in row_labels) + 2 * pad, 3 * w)
    body = contact_sheet(images, columns=len(column_labels), pad=pad)
    canvas = Image.new("RGB", (margin + body.shape[1], line + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (margin, line))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((margin + pad + c * (w + pad), pad), fit(label, w), fill="black", font=font)
    for r, label in enumerate(row_labels):
        top = line + pad + r * (h + pad) + max(0, (h - line) // 2)
        draw.text((pad, top), fit(label, margin - 2 * pad), fill="black", font=font)
    return np.asarray(canvas)
