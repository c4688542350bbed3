"""Shared plumbing of the scripts: `--config file.py[:arg]` with `--config.x=y` overrides,
`--workdir`, and user errors printed as one line (no traceback) with exit status 2 (a training
stopped by SIGTERM / SIGINT after its final checkpoint: 128 + the signal number).

    from safealign_jax import cli
    CONFIG = cli.define_flags()
    def main(config, workdir): ...
    if __name__ == "__main__":
        cli.run(main, CONFIG)
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from safealign_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags(workdir_required: bool = True):
    """Defines --config (an ml_collections config file) and --workdir; returns the config flag."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file, `configs/NAME.py[:arg]`; override fields with --config.x=y.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Folder the script writes to (and resumes from).")
    if workdir_required:
        flags.mark_flag_as_required("workdir")
    flags.mark_flag_as_required("config")
    return config


def run(main, config_flag) -> None:
    """Parses flags and calls `main(config, workdir)`; UserErrors exit 2 with one line."""

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)
        workdir = FLAGS.workdir and os.path.abspath(FLAGS.workdir)
        try:
            main(config_flag.value, workdir)
        except UserError as e:
            _fail(str(e), getattr(e, "exit_code", 2))

    app.run(_main, flags_parser=_parse_flags)


def output_folder(path: str) -> str:
    """Creates the output folder `path` (with parents); UserError naming it if that fails."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={path}: cannot create the output folder ({e.strerror}).") from None
    return path


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-field typos and bad values reported in one line."""
    for i, arg in enumerate(argv):
        path = arg[len("--config="):] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path is not None and not os.path.isfile(path.split(":")[0]):
            _fail(f"--config {path}: no such config file (expected configs/NAME.py[:arg]).")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if "Traceback (most recent call last)" in str(e):  # the config file's get_config raised
            _fail(f"{lines[0]} {lines[-1].split(': ', 1)[-1]}")
        _fail(lines[0])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).encode().decode("unicode_escape").replace("'", "").split()
        _fail(f"bad --config override: no such field {' '.join(text)}")
    return []


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
