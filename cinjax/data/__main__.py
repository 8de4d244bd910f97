"""Check or preprocess a dataset before training.

    python -m cinjax.data verify  --config configs/mmwhs.py [--config.data.root=...]
    python -m cinjax.data prepare --config configs/mmwhs.py [--splits=training,validation,test]

``verify`` reads every datalist and every volume and prints ALL problems at once (each names the
file and what is wrong); the exit status is 1 if there is any. ``prepare`` builds the preprocessing
cache (reusing valid entries) so that training starts without the preprocessing pass.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

from cinjax.data import preprocess
from cinjax.data.datalist import SPLITS
from cinjax.data.io import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_SPLITS = flags.DEFINE_list(
    "splits",
    None,
    f"Splits to check / prepare (default: verify {','.join(SPLITS)}; prepare training,validation).",
)
_WORKERS = flags.DEFINE_integer("workers", None, "Processes (default: config.data.preprocess_workers).")

_USAGE = "usage: python -m cinjax.data {verify,prepare} --config CONFIG.py"


def _maybe_generate_phantom(data) -> None:
    """Configs with ``data.phantom.generate`` (the demo) describe data that is written on first use."""
    from cinjax.data import phantom

    info = phantom.generate_from_config(data)
    if info and info.get("generated"):
        print(f"Generated the phantom dataset in {info['root']} ({info['seconds']:.1f} s).")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("verify", "prepare"):
        raise app.UsageError(_USAGE)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required. " + _USAGE)
    config = _CONFIG.value
    _maybe_generate_phantom(preprocess.data_section(config))
    start = time.perf_counter()
    if argv[1] == "verify":
        splits = tuple(_SPLITS.value or SPLITS)
        problems = preprocess.verify(config, splits, workers=_WORKERS.value)
        if problems:
            print(f"{len(problems)} problem(s) found:", file=sys.stderr)
            for p in problems:
                print(f"- {p}", file=sys.stderr)
            return 1
        print(
            f"OK: every datalist entry and volume of {', '.join(splits)} is usable "
            f"({time.perf_counter() - start:.1f} s)."
        )
        return 0
    splits = tuple(_SPLITS.value or ("training", "validation"))
    try:
        prepared = preprocess.prepare(config, splits, workers=_WORKERS.value)
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 1
    for split, by_mod in prepared.records.items():
        counts = ", ".join(f"{name}: {len(recs)}" for name, recs in by_mod.items())
        print(f"{split}: {counts}")
    print(
        f"cache {prepared.cache_dir}: {prepared.written} entries written, the rest reused "
        f"({time.perf_counter() - start:.1f} s)."
    )
    return 0


if __name__ == "__main__":
    app.run(main)
