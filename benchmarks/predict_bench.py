"""Prediction from a run directory: time per volume and Dice, with and without TTA and post-processing.

For each variant (plain; largest-component post-processing as the run decided it; 8-flip mirroring
TTA; both) the run's :class:`cinjax.predict.Predictor` segments every labelled volume of a datalist
split into a temporary folder, and :func:`cinjax.evaluate.score_folder` scores the folder against the
labels in the input geometry (the code of ``python -m cinjax.evaluate``). Times are per volume after
one untimed warm-up volume (compiles excluded), median over the volumes; the whole variant's wall time
and the compile time of the first volume are reported too.

Usage::

    python -m benchmarks.predict_bench --run /tmp/cinjax-demo \\
        --datalist ~/.cache/cinjax/phantom/CT.json --datalist ~/.cache/cinjax/phantom/MR.json \\
        [--split test] [--checkpoint best] [--out predict_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

from cinjax import evaluate, runspec
from cinjax.data import datalist
from cinjax.data.io import load_image, write_nifti
from cinjax.predict import Predictor, output_name

VARIANTS = {
    "plain": dict(tta_axes=None, postprocess=False),
    "postprocess": dict(tta_axes=None, postprocess=True),
    "tta": dict(tta_axes=(0, 1, 2), postprocess=False),
    "tta+postprocess": dict(tta_axes=(0, 1, 2), postprocess=True),
}


def _labelled(paths: Sequence[str], spec: runspec.InferenceSpec, split: str) -> list[tuple[str, str, int]]:
    out = []
    for path in paths:
        entries = datalist.read_datalist(os.path.expanduser(path), None, spec.modalities)[split]
        out += [(e.image, e.label, e.modality) for e in entries if e.label is not None]
    if not out:
        raise SystemExit(f"No labelled {split!r} volumes in {list(paths)}.")
    return out


def run_variant(
    run: str, checkpoint: str, volumes: list[tuple[str, str, int]], tta_axes: Any, postprocess: bool
) -> dict[str, Any]:
    start = time.perf_counter()
    predictor = Predictor.from_run(run, checkpoint, tta_axes=tta_axes, postprocess=postprocess)
    times = []
    with tempfile.TemporaryDirectory() as pred_dir, tempfile.TemporaryDirectory() as gt_dir:
        for i, (image_path, label_path, modality) in enumerate(volumes):
            image, geom = load_image(image_path)
            t0 = time.perf_counter()
            labels = predictor.predict(image, modality, geom.affine)
            times.append(time.perf_counter() - t0)
            if i == 0:  # the first volume compiles; time it once more
                t0 = time.perf_counter()
                labels = predictor.predict(image, modality, geom.affine)
                times.append(time.perf_counter() - t0)
            write_nifti(os.path.join(pred_dir, output_name(image_path)), labels, geom.affine)
            os.symlink(label_path, os.path.join(gt_dir, output_name(image_path)))
        wall = time.perf_counter() - start
        scores = evaluate.score_folder(pred_dir, gt_dir, label_codes="mmwhs")
    return {
        "volume_s": statistics.median(times[1:]),
        "volume_s_all": times[1:],
        "first_volume_s": times[0],
        "wall_s": wall,
        "flips": len(predictor.flips) or 1,
        "postprocessing": predictor.describe()["postprocessing"],
        "mean_dice": scores["mean_dice"],
        "modalities": {
            m: {k: r[k] for k in r if k.startswith("mean_") or k.endswith("_dice")}
            for m, r in scores["modalities"].items()
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_bench", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--datalist", action="append", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    spec = runspec.read(args.run)
    volumes = _labelled(args.datalist, spec, args.split)
    result = {
        "run": os.path.abspath(args.run),
        "split": args.split,
        "volumes": len(volumes),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "variants": {},
    }
    for name in args.variants:
        r = run_variant(args.run, args.checkpoint, volumes, **VARIANTS[name])
        result["variants"][name] = r
        per_mod = ", ".join(f"{m} {v['mean_dice']:.4f}" for m, v in r["modalities"].items())
        print(f"{name:16s} {r['volume_s']:6.2f} s/volume, mean Dice {r['mean_dice']:.4f} ({per_mod})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
