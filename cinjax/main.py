r"""cinjax entry point.

    python -m cinjax.main --config configs/demo.py --workdir /tmp/demo
    python -m cinjax.main --config configs/mmwhs.py:unet --workdir runs/cunet \
        --config.data.root=/data/MM-WHS --config.mode=train

``config.mode``: ``train`` (train with periodic evaluation, then a final evaluation), ``eval`` (evaluate
a checkpoint), ``predict`` (write NIfTI segmentations). Multi-host: set ``--coordinator_address``,
``--num_processes`` and ``--process_id`` or launch under SLURM / on a TPU pod (auto-detected).

Exit status: 0 done; 1 an error (one line of cause for the errors cinjax diagnoses: bad config or data,
workdir in use, damaged or mismatched checkpoint, non-finite training, disk full; ``--verbose_errors``
adds the traceback); 75 stopped by SIGTERM / SIGINT with a committed checkpoint: rerun to resume.
"""

from __future__ import annotations

import errno
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cinjax import hostmem

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
_VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors", False, "Show the full traceback of errors cinjax explains in one message."
)
flags.mark_flags_as_required(["config", "workdir"])

# Exit status after a SIGTERM / SIGINT stop with its checkpoint committed (EX_TEMPFAIL): not finished,
# rerun the same command to resume. Job scripts can requeue on it.
EXIT_PREEMPTED = 75


class _QuietLibraries(py_logging.Filter):
    """Keep INFO chatter of orbax / grain / jax out of the user's log (warnings still pass)."""

    NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/etils/")

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


COMPILATION_CACHE_ENV = "CINJAX_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE = "~/.cache/cinjax/xla"


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache, on by default, so a second run of a config compiles in
    seconds: ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$CINJAX_COMPILATION_CACHE`` (empty: off),
    else ``~/.cache/cinjax/xla``. Returns the directory in use (None: off)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = os.environ.get(COMPILATION_CACHE_ENV, DEFAULT_COMPILATION_CACHE)
    if not path:
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for handler in py_logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    # Must come before any other JAX call.
    from cinjax import distributed

    distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    enable_compilation_cache()
    from cinjax import config as config_schema
    from cinjax import evaluate, predict, train

    config = _CONFIG.value
    modes = {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate_checkpoint,
        "predict": predict.predict,
    }
    try:
        config_schema.validate(config)
        logging.info("mode=%s workdir=%s", config.mode, _WORKDIR.value)
        result = modes[config.mode](config, _WORKDIR.value)
    except Exception as e:
        message = explain(e)
        if message is None or _VERBOSE_ERRORS.value:
            raise
        print(
            f"cinjax: error: {message}\n(--verbose_errors shows the traceback)", file=sys.stderr, flush=True
        )
        sys.exit(1)
    if isinstance(result, dict) and "stopped_at" in result:
        sys.exit(EXIT_PREEMPTED)


def explain(error: BaseException) -> str | None:
    """The message of an error cinjax diagnoses (bad config or data, workdir in use, damaged or
    mismatched checkpoint, non-finite training, disk full), or None for an unexpected one (which
    keeps its traceback)."""
    from cinjax import checkpointing, config, runspec, train, workdir
    from cinjax.data.io import DataError

    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return (
                "disk full while writing to the workdir or cache; the last committed checkpoint is kept. "
                "Free disk space and rerun the same command to resume."
            )
    known = (
        config.ConfigError,
        DataError,
        workdir.WorkdirError,
        checkpointing.CheckpointNotFoundError,
        checkpointing.CheckpointMismatchError,
        train.NonFiniteLossError,
        runspec.RunSpecError,
    )
    return str(error) if isinstance(error, known) else None


def run() -> None:
    """Console-script entry point (``cinjax --config ... --workdir ...``). It first restarts the process
    once with glibc's huge-page tunable where that applies (``cinjax.hostmem``), before JAX is loaded."""
    hostmem.ensure_huge_pages()
    app.run(main)


if __name__ == "__main__":
    run()
