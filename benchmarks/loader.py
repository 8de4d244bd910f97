"""Training-loader throughput (crops/s): cinjax's grain pipeline vs MI-Seg's MONAI pipeline.

Synthetic volumes (default four of 160³: two per modality, with ~7 % labelled foreground inside a
non-zero body) are written to a temporary tensorstore cache. For every crop size and worker count:

* cinjax: ``make_train_loader`` (interleave mode, default thread prefetch) over the cache, with
  ``transforms.train_sample`` (pos/neg crop from precomputed candidates, flips, rot90, intensity).
* MONAI (when importable): MI-Seg's recipe on the same arrays held in RAM: ``CacheDataset`` +
  ``RandCropByPosNegLabeld`` (pos 1, neg 1, one sample, image_threshold 0) + ``RandFlipd`` on each
  axis (p 0.2) + ``RandRotate90d`` (p 0.2, max_k 3) + ``RandScaleIntensityd`` / ``RandShiftIntensityd``
  (0.1, p 0.1), torch ``DataLoader`` with the same batch size and workers (persistent workers).

Both are timed over ``--batches`` batches after ``--warmup`` untimed ones, so that start-up (reported
as ``first_batch_s``) and batches prepared ahead during the warm-up (prefetch buffers hold at most
a few batches) do not count: the figure is the steady-state production rate, the median of
``--repeats`` runs. The ratio is cinjax crops/s over MONAI crops/s. ``cinjax_sync`` (0 workers
only) is cinjax with its background prefetch threads off, i.e. fully synchronous like MONAI's
``num_workers=0``. ``cpu_ms_per_crop`` is this process's CPU time (all its threads) per timed crop:
with 0 workers it is the whole cost of a crop and, unlike crops/s, hardly moves when other jobs
share the cores; with workers it is only the main process's share. All MONAI runs come first,
before JAX and tensorstore start threads in this process (its DataLoader forks workers); torch runs
with one intra-op thread, as in its workers.

Usage: ``python -m benchmarks.loader [--crops 96 64] [--workers 0 1 2] [--repeats 3] [--out loader.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def synthetic_volume(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image in [0, 1] with a zero border (air) and a label with 7 ellipsoid classes (~7 % of voxels)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.85
    image = np.where(body, 0.3 + 0.1 * rng.random(shape, dtype=np.float32), 0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for c in range(1, 8):
        centre = rng.uniform(-0.35, 0.35, size=(3, 1, 1, 1)).astype(np.float32)
        radii = rng.uniform(0.25, 0.35, size=(3, 1, 1, 1)).astype(np.float32)
        inside = (((grid - centre) / radii) ** 2).sum(0) < 1
        label[inside] = c
        image[inside] = 0.4 + 0.07 * c
    return image, label


def synthetic_arrays(per_modality: int, shape: Sequence[int], seed: int) -> dict[str, list]:
    """``{"CT": [(image, label), ...], "MR": [...]}``."""
    rng = np.random.default_rng(seed)
    return {name: [synthetic_volume(rng, shape) for _ in range(per_modality)] for name in ("CT", "MR")}


def write_cache(root: str, arrays: dict[str, list]) -> dict[str, list]:
    """One cache entry per volume: ``{name: [VolumeRecord, ...]}`` (modality ids 0, 1 in dict order)."""
    from cinjax.data import cache

    return {
        name: [
            cache.write_entry(
                os.path.join(root, f"{name}_{i}"),
                key=f"{name}_{i}",
                modality=modality,
                image=image,
                label=label,
                meta={"synthetic": True},
            )
            for i, (image, label) in enumerate(volumes)
        ]
        for modality, (name, volumes) in enumerate(arrays.items())
    }


def time_cinjax(
    records, crop: int, workers: int, batch: int, batches: int, warmup: int, seed: int, prefetch: int = 2
) -> dict[str, float]:
    from cinjax.data import pipeline, transforms

    cfg = transforms.TransformConfig(roi=(crop, crop, crop))
    start = time.perf_counter()
    loader = pipeline.make_train_loader(
        records, global_batch_size=batch, seed=seed, transform_cfg=cfg, num_workers=workers, prefetch=prefetch
    )
    loader.next_local()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        loader.next_local()
    start = time.perf_counter()
    cpu = time.process_time()
    for _ in range(batches):
        loader.next_local()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    loader.close()
    del loader
    gc.collect()
    return {
        "crops_per_s": batch * batches / elapsed,
        "first_batch_s": first,
        "cpu_ms_per_crop": 1000 * cpu / (batch * batches),
    }


def time_monai(
    arrays, crop: int, workers: int, batch: int, batches: int, warmup: int, seed: int
) -> dict[str, float]:
    import monai
    import torch
    from monai import transforms as mt

    monai.utils.set_determinism(seed)
    torch.set_num_threads(1)  # as in DataLoader workers; 2 intra-op threads ran 4x slower on 2 busy cores
    keys = ("image", "label")
    data = [
        {"image": image[None], "label": label[None].astype(np.float32), "modality": modality}
        for modality, name in enumerate(("CT", "MR"))
        for image, label in arrays[name]
    ]
    transform = mt.Compose(
        [
            mt.EnsureTyped(keys=keys, track_meta=True),
            mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=(crop,) * 3,
                pos=1,
                neg=1,
                num_samples=1,
                image_key="image",
                image_threshold=0,
            ),
            mt.RandFlipd(keys=keys, prob=0.2, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=0.2, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=0.2, spatial_axis=2),
            mt.RandRotate90d(keys=keys, prob=0.2, max_k=3),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
            mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
            mt.ToTensord(keys=keys),
        ]
    )
    dataset = monai.data.CacheDataset(
        data, transform=transform, cache_rate=1.0, num_workers=1, progress=False
    )
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=batch * (batches + warmup)
    )
    start = time.perf_counter()
    loader = monai.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    start = time.perf_counter()
    cpu = time.process_time()
    count = sum(1 for _ in it)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if count != batches:
        raise RuntimeError(f"MONAI loader gave {count} timed batches, expected {batches}.")
    return {
        "crops_per_s": batch * batches / elapsed,
        "first_batch_s": first,
        "cpu_ms_per_crop": 1000 * cpu / (batch * batches),
    }


def _median_runs(samples: list[dict[str, float]]) -> dict[str, Any]:
    rates = [x["crops_per_s"] for x in samples]
    return {
        "crops_per_s": float(np.median(rates)),
        "crops_per_s_all": rates,
        "first_batch_s": float(np.median([x["first_batch_s"] for x in samples])),
        "cpu_ms_per_crop": float(np.median([x["cpu_ms_per_crop"] for x in samples])),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[96, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shape", type=int, default=160, help="edge of the synthetic cubic volumes")
    parser.add_argument("--volumes", type=int, default=2, help="volumes per modality (2 modalities)")
    parser.add_argument("--batch", type=int, default=2, help="crops per batch (both pipelines)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (start-up, buffers)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-monai", action="store_true", help="skip the MONAI reference")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        import monai  # noqa: F401

        have_monai = not args.no_monai
    except ImportError:
        have_monai = False

    results: dict[str, Any] = {
        "env": {
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_avg_start": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    configs = [(crop, workers) for crop in args.crops for workers in args.workers]
    arrays = synthetic_arrays(args.volumes, (args.shape,) * 3, args.seed)
    timing = lambda fn, *a, **kw: fn(*a, args.batch, args.batches, args.warmup, args.seed, **kw)  # noqa: E731
    samples: dict[tuple, list] = {}
    # MONAI first: its DataLoader forks workers, which must happen before JAX and tensorstore start threads.
    if have_monai:
        for _ in range(args.repeats):
            for crop, workers in configs:
                samples.setdefault(("monai", crop, workers), []).append(
                    timing(time_monai, arrays, crop, workers)
                )
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this is not an absl app
    with tempfile.TemporaryDirectory(prefix="cinjax-loader-bench-") as root:
        records = write_cache(root, arrays)
        for _ in range(args.repeats):
            for crop, workers in configs:
                samples.setdefault(("cinjax", crop, workers), []).append(
                    timing(time_cinjax, records, crop, workers)
                )
                if workers == 0:
                    samples.setdefault(("cinjax_sync", crop, 0), []).append(
                        timing(time_cinjax, records, crop, 0, prefetch=0)
                    )
    results["env"]["load_avg_end"] = os.getloadavg()
    results["runs"] = []
    for crop, workers in configs:
        run: dict[str, Any] = {"crop": crop, "workers": workers}
        for name in ("cinjax", "cinjax_sync", "monai"):
            if (name, crop, workers) in samples:
                run[name] = _median_runs(samples[(name, crop, workers)])
        if "monai" in run:
            run["ratio_vs_monai"] = run["cinjax"]["crops_per_s"] / run["monai"]["crops_per_s"]
        results["runs"].append(run)
    nan = float("nan")
    print(
        f"{'crop':>4} {'workers':>7} {'cinjax crops/s':>14} {'no-prefetch':>11} {'MONAI crops/s':>13}"
        f" {'ratio':>5}"
        f" {'CPU ms/crop: cinjax':>19} {'no-prefetch':>11} {'MONAI':>6}"
    )
    for run in results["runs"]:

        def get(name: str, key: str, run: dict = run) -> float:
            return run.get(name, {}).get(key, nan)

        cpu = [
            get(n, "cpu_ms_per_crop") if run["workers"] == 0 else nan
            for n in ("cinjax", "cinjax_sync", "monai")
        ]
        print(
            f"{run['crop']:>4} {run['workers']:>7} {get('cinjax', 'crops_per_s'):>14.1f} "
            f"{get('cinjax_sync', 'crops_per_s'):>11.1f} {get('monai', 'crops_per_s'):>13.1f} "
            f"{run.get('ratio_vs_monai', nan):>5.2f} {cpu[0]:>19.1f} {cpu[1]:>11.1f} {cpu[2]:>6.1f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
