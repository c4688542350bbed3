"""Shared plumbing of the commands: `--config file.py[:arg]` (or `NAME[:arg]`, a config shipped in
`safealign_jax/configs`) with `--config.x=y` overrides, `--workdir`, `--verbosity`, progress lines,
and user errors printed as one line (no traceback) with exit status 2 (a training
stopped by SIGTERM / SIGINT after its final checkpoint: 128 + the signal number).

    from safealign_jax import cli
    def run(config, workdir): ...
    def main():  # the console entry point (pyproject [project.scripts])
        cli.main(run)

Output: progress lines and results on stdout, errors (one line) on stderr. `--verbosity` (absl's
flag): -1 (default) prints progress lines; -2 or less (quiet) only the results and errors; 0 or
more also absl / JAX INFO logs.
Every command uses JAX's persistent compilation cache (`compilation_cache_folder`).
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from safealign_jax.errors import UserError

FLAGS = flags.FLAGS
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
QUIET = -2  # --verbosity at or below which only results and errors are printed
_START = time.perf_counter()
_verbosity = -1  # set from --verbosity by run(); library callers outside a command talk
_config_path = ""  # --config as resolved by _parse_flags
_cache = None  # the compilation cache folder while a command runs (see command_cache)


def define_flags(workdir_required: bool = True):
    """Defines --config (an ml_collections config file) and --workdir; returns the config flag."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file `configs/NAME.py[:arg]`, or `NAME[:arg]` (a config shipped in the "
        "package); override fields with --config.x=y.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Folder the script writes to (and resumes from).")
    if workdir_required:
        flags.mark_flag_as_required("workdir")
    flags.mark_flag_as_required("config")
    return config


def main(run_fn, workdir_required: bool = True, announce: bool = False) -> None:
    """A command's entry point: defines --config / --workdir, then `run(run_fn, ...)`."""
    run(run_fn, define_flags(workdir_required), announce)


def run(main, config_flag, announce: bool = False) -> None:
    """Parses flags, turns on the compilation cache and calls `main(config, workdir)`; UserErrors
    exit 2 with one line. `announce`: first print `NAME: CONFIG -> WORKDIR` (before any heavy
    import of `main`)."""

    def _main(argv):
        global _verbosity, _cache
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        _verbosity = FLAGS.verbosity if FLAGS["verbosity"].present else -1
        logging.set_verbosity(_verbosity if FLAGS["verbosity"].present else logging.WARNING)
        workdir = FLAGS.workdir and os.path.abspath(FLAGS.workdir)
        name = os.path.basename(sys.argv[0]).removesuffix(".py")
        if announce:
            status(f"{name}: {_config_path}" + (f" -> {workdir}" if workdir else ""))
        try:
            _cache = _enable_compilation_cache()
            main(config_flag.value, workdir)
        except UserError as e:
            _fail(str(e), getattr(e, "exit_code", 2))
        finally:
            _cache = None

    app.run(_main, flags_parser=_parse_flags)


def talking() -> bool:
    """Whether progress lines are printed (`--verbosity` above the quiet level)."""
    return _verbosity > QUIET


def status(message: str) -> None:
    """One progress line on stdout, `[seconds since start] message`, unless quiet."""
    if talking():
        print(f"[{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def compilation_cache_folder() -> str:
    """The persistent XLA compilation cache of the commands: $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/safealign_jax/xla (default ~/.cache/safealign_jax/xla)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "safealign_jax", "xla")


def command_cache() -> str | None:
    """The compilation cache folder of the running command (None outside `run`, or when the
    folder could not be created): the trainer's default for `train.compilation_cache`."""
    return _cache


def _enable_compilation_cache() -> str | None:
    """`compilation_cache_folder` for every compile of at least a second; through JAX's environment
    variables while JAX is not imported yet (the first line comes before that import)."""
    folder = compilation_cache_folder()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        status(f"warning: no compilation cache ({folder}: {e.strerror})")
        return None
    if "jax" in sys.modules:
        from safealign_jax.perf.cache import enable_compilation_cache

        return enable_compilation_cache(folder)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return os.path.abspath(folder)


def output_folder(path: str) -> str:
    """Creates the output folder `path` (with parents); UserError naming it if that fails."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={path}: cannot create the output folder ({e.strerror}).") from None
    return path


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-field typos and bad values reported in one line."""
    global _config_path
    argv = list(argv)
    for i, arg in enumerate(argv):
        at = i if arg.startswith("--config=") else i + 1 if arg == "--config" and i + 1 < len(argv) else None
        if at is not None:
            path = argv[at].removeprefix("--config=")
            resolved = resolve_config(path)
            if resolved is None:
                _fail(f"--config {path}: no such config file (expected configs/NAME.py[:arg] or NAME[:arg]).")
            argv[at] = f"--config={resolved}" if at == i else resolved
            _config_path = path
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


def resolve_config(path: str) -> str | None:
    """`path` (`FILE[:arg]`) when FILE exists; else the packaged config of the same name
    (`train`, `train.py` or `configs/train.py` -> safealign_jax/configs/train.py) with its `:arg`;
    None when neither exists."""
    file, colon, arg = path.partition(":")
    if os.path.isfile(file):
        return path
    packaged = os.path.join(CONFIGS, os.path.basename(file).removesuffix(".py") + ".py")
    return packaged + colon + arg if file and os.path.isfile(packaged) else None


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
