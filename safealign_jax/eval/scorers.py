"""The metric models of an evaluation (Q16, NudeNet, CLIPScore, the judge, the user profiles),
each loaded once on first use; `check` verifies, before any image is generated, that every model
folder and package an enabled metric needs is there (configs/evaluate.py's `metrics` / `models`)."""

import importlib.util
import os

from safealign_jax.data.users import read_users
from safealign_jax.errors import UserError, check
from safealign_jax.eval.device import torch_device

SAFETY_BENCHMARKS = ("i2p", "ud", "coprov2", "sage_seen", "sage_unseen", "custom")
JUDGE_BENCHMARKS = ("sage_seen", "sage_unseen", "custom")


def names(text: str) -> list[str]:
    """The names of a comma-separated list ("a, b," -> ["a", "b"])."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _require(path: str, field: str, what: str, is_file: bool = False) -> None:
    ok = os.path.isfile(path) if is_file else os.path.isdir(path)
    if not path or not ok:
        raise UserError(f"--config.models.{field}={path!r}: no such {'file' if is_file else 'folder'}; provide {what}.")


def _installed(module: str, package: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{why} needs the Python package {package} (pip install {package}).")


class Scorers:
    """The metric models of the enabled metrics, loaded once (checked up front by `check`)."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.device = torch_device(config.metrics.device)  # Q16 and CLIPScore; FID: scoring.fid_score
        self._loaded: dict = {}

    def check(self, benchmarks: list[str]) -> None:
        c, m = self.config.metrics, self.config.models
        safety = any(b in SAFETY_BENCHMARKS for b in benchmarks)
        if c.q16 and safety:
            _require(m.q16_clip, "q16_clip", "a transformers CLIP ViT-L/14 folder")
            _require(m.q16_prompts, "q16_prompts", "q16_vit_l14_prompts.npy", is_file=True)
        if c.nudenet and safety:
            _installed("nudenet", "nudenet", "--config.metrics.nudenet")
            if m.nudenet:
                _require(m.nudenet, "nudenet", "a NudeNet .onnx detector (empty: the one in the nudenet wheel)", is_file=True)
        if c.clip_score and set(benchmarks) & set(names(c.clip_benchmarks)):
            _require(m.clip_score, "clip_score", "the CLIPScore model folder (open_clip ViT-H-14 or a transformers CLIP)")
            if m.clip_score_kind == "open_clip":
                _installed("open_clip", "open_clip_torch", "--config.models.clip_score_kind=open_clip")
        if c.fid and "coco" in benchmarks:
            if m.inception:
                _require(m.inception, "inception", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth", is_file=True)
            reference = m.fid_reference
            _require(reference, "fid_reference", "a folder of real COCO images or an .npz with mu, sigma",
                     is_file=reference.endswith(".npz"))
        if (c.pass_rate or c.win_rate) and set(benchmarks) & set(JUDGE_BENCHMARKS):
            users = self.config.psa.users
            check(os.path.exists(users), f"--config.psa.users={users!r}: no such users.csv (the judge needs profiles).")
            self.judge()
            if c.win_rate:
                base = os.path.join(self.workdir, self.config.judge.baseline)
                check(os.path.isdir(base), f"--config.judge.baseline={self.config.judge.baseline!r}: {base} does not exist; evaluate the baseline first.")

    def _get(self, key, build):
        if key not in self._loaded:
            self._loaded[key] = build()
        return self._loaded[key]

    def q16(self):
        from safealign_jax.eval.q16 import Q16

        m = self.config.models
        return self._get("q16", lambda: Q16.from_folders(m.q16_clip, m.q16_prompts, device=self.device,
                                                         batch_size=self.config.metrics.batch_size))

    def nudenet(self):
        from safealign_jax.eval.nudity import NudityDetector

        return self._get("nudenet", lambda: NudityDetector(self.config.models.nudenet or None))

    def clip(self):
        from safealign_jax.eval.clip_score import ClipScorer

        m = self.config.models
        return self._get("clip", lambda: ClipScorer.from_folder(m.clip_score, m.clip_score_kind, device=self.device))

    def users(self):
        path = self.config.psa.users
        path = os.path.join(path, "users.csv") if os.path.isdir(path) else path
        return self._get("users", lambda: read_users(path))

    def judge(self):
        from safealign_jax.eval.judge import Judge, JudgeSettings

        j = self.config.judge
        settings = JudgeSettings(base_url=j.base_url, model=j.model, api_key_env=j.api_key_env,
                                 temperature=j.temperature, attempts=j.attempts, backoff_s=j.backoff_s,
                                 timeout_s=j.timeout_s, seed=j.seed)
        return self._get("judge", lambda: Judge(settings, os.path.join(self.workdir, "judge_cache")))
