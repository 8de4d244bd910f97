r"""cinjax entry point.

    python -m cinjax.main --config configs/demo.py --workdir /tmp/demo
    python -m cinjax.main --config configs/mmwhs.py:unet --workdir runs/cunet \
        --config.data.root=/data/MM-WHS --config.mode=train

``config.mode``: ``train`` (train with periodic evaluation, then a final evaluation), ``eval`` (evaluate
a checkpoint), ``predict`` (write NIfTI segmentations). Multi-host: set ``--coordinator_address``,
``--num_processes`` and ``--process_id`` or launch under SLURM / on a TPU pod (auto-detected).
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


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
    config_schema.validate(config)
    logging.info("mode=%s workdir=%s", config.mode, _WORKDIR.value)
    modes = {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate_checkpoint,
        "predict": predict.predict,
    }
    modes[config.mode](config, _WORKDIR.value)


def run() -> None:
    """Console-script entry point (``cinjax --config ... --workdir ...``)."""
    app.run(main)


if __name__ == "__main__":
    run()
