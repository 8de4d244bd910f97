"""Check or preprocess a dataset before training.

    python -m cinjax.data verify  --config configs/mmwhs.py [--config.data.root=...]
    python -m cinjax.data prepare --config configs/mmwhs.py [--splits=training,validation,test]

``verify`` reads every datalist and every volume and prints ALL problems at once (each names the
file and what is wrong); the exit status is 1 if there is any. Warnings (doubtful but usable volumes,
damaged cache entries that ``prepare`` rebuilds) are printed apart and leave the status 0. ``prepare``
builds the preprocessing cache (reusing valid entries) so that training starts without the
preprocessing pass. Ctrl-C stops either promptly with status 130; entries already written are kept.
"""

from __future__ import annotations

import sys
import time

import ml_collections
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


def _print_list(title: str, lines: list[str]) -> None:
    print(f"{len(lines)} {title}:", file=sys.stderr)
    for line in lines:
        print(f"- {line}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("verify", "prepare"):
        raise app.UsageError(_USAGE)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required. " + _USAGE)
    try:
        return _verify(_CONFIG.value) if argv[1] == "verify" else _prepare(_CONFIG.value)
    except KeyboardInterrupt as e:  # preprocess.Interrupted says how far it got
        print(str(e) or "interrupted", file=sys.stderr)
        return 130


def _verify(config: ml_collections.ConfigDict) -> int:
    _maybe_generate_phantom(preprocess.data_section(config))
    start = time.perf_counter()
    splits = tuple(_SPLITS.value or SPLITS)
    warnings: list[str] = []
    problems = preprocess.verify(config, splits, workers=_WORKERS.value, warnings=warnings)
    if warnings:
        _print_list("warning(s)", warnings)
    if problems:
        _print_list("problem(s) found", problems)
        return 1
    note = f", {len(warnings)} warning(s) above" if warnings else ""
    print(
        f"OK: every datalist entry and volume of {', '.join(splits)} is usable "
        f"({time.perf_counter() - start:.1f} s{note})."
    )
    return 0


def _prepare(config: ml_collections.ConfigDict) -> int:
    _maybe_generate_phantom(preprocess.data_section(config))
    start = time.perf_counter()
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
