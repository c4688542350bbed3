"""The torch device of the evaluation metrics (Q16, CLIPScore, FID Inception): "auto" = CUDA when
torch sees a GPU, else the host CPU. TPU hosts run them on the host CPU (see README: evaluation)."""

from safealign_jax.errors import UserError, check

DEVICES = ("auto", "cpu", "cuda")


def torch_device(setting: str, field: str = "--config.metrics.device") -> str:
    """"cpu" or "cuda" for `setting` (one of DEVICES); UserError for "cuda" without a CUDA torch."""
    check(setting in DEVICES, f"{field}={setting!r} is unknown (expected one of {', '.join(DEVICES)}).")
    if setting == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if setting == "auto":
            return "cpu"
        raise UserError(f"{field}=cuda needs torch with CUDA (pip install the CUDA build of torch).") from None
    if torch.cuda.is_available():
        return "cuda"
    check(setting == "auto", f"{field}=cuda but torch {torch.__version__} sees no CUDA device "
          f"(built with CUDA {torch.version.cuda}); use auto or cpu, or install a CUDA build of torch.")
    return "cpu"
