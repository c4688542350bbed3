"""Fréchet distance (FID) between two sets of image features.

FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the matrix square root by scipy's sqrtm with
pytorch-fid's numerics: a non-finite root retried with eps added to both diagonals, a small
imaginary part (numerical noise) dropped, a large one an error. Statistics: mean and unbiased
covariance (np.cov) of (N, D) features; saved/loaded as .npz with arrays `mu` and `sigma`
(pytorch-fid's reference-statistics format). The pure numpy functions need no torch.
Features: FID Inception-v3 pool3 (2048-d) from pytorch-fid's local weights file, or CLIP image
embeddings (FD-CLIP). Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from safealign_jax.convert.files import atomic_path
from safealign_jax.errors import UserError, check
from safealign_jax.eval.clip_model import ClipEncoder, as_images

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
FEATURE_KINDS = ("inception", "clip")


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64; N >= 2."""
    features = np.asarray(features, np.float64)
    check(
        features.ndim == 2 and features.shape[0] >= 2,
        f"FID statistics need features of shape (N >= 2, D), got {features.shape}.",
    )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    check(mu1.shape == mu2.shape, f"FID: means of different sizes {mu1.shape} and {mu2.shape}.")
    check(
        sigma1.shape == sigma2.shape == (mu1.shape[0],) * 2,
        f"FID: covariances {sigma1.shape} and {sigma2.shape} do not match means {mu1.shape}.",
    )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(
                f"FID: the covariance product has a large imaginary square-root part "
                f"({np.max(np.abs(covmean.imag)):.3g}); use more images than feature dimensions."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
    """FD between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*statistics(features1), *statistics(features2))


def save_statistics(path, mu, sigma) -> None:
    """Writes reference statistics as .npz {mu, sigma}, atomically (`convert.files.atomic_path`)."""
    with atomic_path(str(path), ".npz") as tmp:
        np.savez(tmp, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """Reads .npz reference statistics {mu (D,), sigma (D, D)}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FID reference statistics {path} not found: provide an .npz with mu and sigma.")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data]
        check(not missing, f"FID reference statistics {path}: missing arrays {missing} (need mu, sigma).")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    check(
        mu.ndim == 1 and sigma.shape == (mu.shape[0],) * 2,
        f"FID reference statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not match.",
    )
    return mu, sigma


def default_inception_weights() -> Path:
    """Where pytorch-fid caches its weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch)."""
    home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(home) / "hub" / "checkpoints" / FID_WEIGHTS_NAME


class InceptionFeatures:
    """FID Inception-v3 pool3 features of uint8 RGB images (B, H, W, 3) -> float32 (B, 2048)."""

    def __init__(self, model, device: str, batch_size: int):
        self.model, self.device, self.batch_size = model, device, batch_size

    @classmethod
    def from_weights(cls, path=None, *, device: str = "cpu", batch_size: int = 50) -> InceptionFeatures:
        """Loads pytorch-fid's state dict from `path` (default: `default_inception_weights()`)."""
        path = Path(path) if path is not None else default_inception_weights()
        if not path.is_file():
            raise UserError(
                f"FID Inception weights {path} not found: download {FID_WEIGHTS_NAME} from "
                f"{FID_WEIGHTS_URL} and pass its path (or place it at {default_inception_weights()})."
            )
        import torch

        from safealign_jax.eval.fid_inception import build_fid_inception

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"FID Inception weights {path}: not a torch state dict ({error}).") from error
        model = build_fid_inception()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(
                f"FID Inception weights {path} do not fit the FID Inception-v3: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]} (expected pytorch-fid's {FID_WEIGHTS_NAME})."
            )
        return cls(model.to(device), device, batch_size)

    def __call__(self, images) -> np.ndarray:
        import torch

        images = as_images(images, "FID images")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].transpose(0, 3, 1, 2)
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, torch.float32) / 255.0
            with torch.no_grad():
                out.append(self.model(x).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def feature_extractor(
    kind: str = "inception", path=None, *, device: str = "cpu", batch_size: int = 50
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images (B, H, W, 3) -> (B, D) features: "inception" (FID; `path` = weights file,
    optional) or "clip" (FD-CLIP; `path` = a transformers CLIP folder)."""
    if kind == "inception":
        return InceptionFeatures.from_weights(path, device=device, batch_size=batch_size)
    if kind == "clip":
        check(path is not None, "FD-CLIP needs the path of a transformers CLIP model folder.")
        encoder = ClipEncoder.from_folder(
            path, text=False, device=device, batch_size=batch_size, what="FD-CLIP model"
        )
        return encoder.image_features
    raise UserError(f"unknown FID feature kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}.")
