"""Preprocess every volume once into the cache (the grid maths is in :mod:`cinjax.data.geometry`).

Per volume (MI-Seg's deterministic transforms 1–6, docs/mi-seg-spec.md §6.4):

1. load (float32 image, integer label mapped to class ids by ``data.label_codes``), with checks
   (:mod:`cinjax.data.io`);
2. reorient to RAS (nibabel ``as_closest_canonical`` / MONAI ``Orientationd("RAS")``);
3. resample to ``data.spacing`` like MONAI ``Spacingd`` (defaults ``scale_extent=False``,
   ``align_corners=False``, ``padding_mode="border"``, float64): the new affine keeps the direction
   cosines with the target voxel size, output shape ``round((n - 1) * in_spacing / out_spacing) + 1``
   (voxel *centres* of the first and last input voxel span the output) and, for axis-aligned grids,
   output voxel 0 sits on input voxel 0; output voxel ``o`` samples the input at voxel coordinate
   ``inv(A_in) @ A_out @ o`` (voxel centres, which is what ``align_corners=False`` with MONAI's
   normalisation amounts to), trilinear for the image and nearest (round half to even) for the label,
   coordinates clamped to the volume (border). Images match MONAI 1.6 to float32 rounding and labels
   exactly, except on exact half-voxel ties (e.g. 2 mm -> 1 mm), where MONAI's choice follows the
   rounding noise of its normalised grid (``torch.linspace`` uses FMA on AVX2 CPUs, so it is
   platform-dependent): measured 0.13 % of the voxels of a 1.2 x 1.2 x 2 mm volume resampled to 1 mm;
4. intensity scaling of the image (``data.intensity``; default per-volume min–max to [0, 1]);
5. symmetric constant-0 padding to at least ``data.roi``;
6. write a cache entry (:func:`cinjax.data.cache.write_entry`) whose metadata holds everything needed to
   invert steps 2–5 (:func:`cinjax.data.geometry.invert_to_original`).

Arrays in the cache are indexed in RAS voxel order (axes x, y, z after reorientation): MONAI's
channel-first layout without the channel, i.e. exactly what MI-Seg's networks saw as (D, H, W).

Entries live in ``<cache_dir>/<modality>/<file name>-<hash>``; the hash covers the source files (size +
mtime, or their bytes with ``cache_fingerprint="content"``) and every setting that changes the result,
so a changed source or setting makes a new entry and an unchanged one is reused without re-reading.
An entry is reused only while every file it wrote still has its size (:func:`cache.check_entry`); a
damaged one is rebuilt with a warning. :func:`verify` also compares the entries' bytes with the
CRC-32s recorded at write time.

``config.data`` keys (defaults in :func:`cinjax.data.config.default_data_config`):

=========================  ==========================================================================
``root``                   dataset directory; datalist paths resolve against it
``layout``                 ``"json"`` (MI-Seg / Decathlon datalists) or ``"mmwhs"`` (folder layout)
``json_lists``             datalist files, e.g. ``("CT_fold1.json", "MR.json")`` (layout json)
``data_dirs``              one sub-directory of ``root`` per datalist (MI-Seg ``--data_dirs``), or ``()``
``modalities``             name -> id, ids 0..M-1, e.g. ``{"CT": 0, "MR": 1}``
``mmwhs.validation_ids``   name -> ids held out for validation (layout mmwhs)
``mmwhs.image_suffix``     ``"image"`` (or e.g. ``"image_corrected"``); ``mmwhs.label_suffix`` likewise
``label_codes``            ``"identity"`` (labels already 0..C-1), ``"mmwhs"`` (500, 600, 420, 550, 205,
                           820, 850 -> 1..7) or a ``{code: class}`` map; 0 is background
``num_classes``            classes including background (8 for MM-WHS)
``class_names``            one name per class
``spacing``                target voxel size in mm (x, y, z) after RAS; ``()`` keeps the native grid
``roi``                    training crop size; volumes are padded to at least this
``intensity.mode``         ``"minmax"`` | ``"window"`` (clip to ``intensity.window`` then scale to [0, 1],
                           e.g. a CT HU window) | ``"percentile"`` (clip to ``intensity.percentiles``
                           then scale) | ``"zscore"`` | ``"none"``
``intensity_by_modality``  name -> overrides of ``intensity`` for one modality, e.g.
                           ``{"CT": {"mode": "window"}}``
``affine_atol``            largest accepted image/label affine difference (mm)
``cache_dir``              where entries go (default ``~/.cache/cinjax/volumes``)
``cache_fingerprint``      ``"stat"`` (size + mtime) or ``"content"`` (sha256 of the file bytes)
``preprocess_workers``     processes for preprocessing / verify (0 or 1: in this process); each holds
                           one volume at a time, ~1 GB peak for a 512 x 512 x 200 CT
=========================  ==========================================================================

Background crop candidates are voxels with label 0 and image > 0 (MI-Seg's ``image_threshold=0``),
which suits the [0, 1] scalings; with ``zscore`` they cover only above-mean voxels.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from cinjax.data import cache
from cinjax.data.datalist import (
    SPLITS,
    Entry,
    check_modalities,
    collect_entries,
    label_code_map,
    load_entries,
    modality_names,
)
from cinjax.data.geometry import resample, resampled_grid, to_ras
from cinjax.data.io import DataError, Geometry, check_pair, load_image, load_label, map_label_codes
from cinjax.shapes import padding_to

VERSION = 2  # bump when the preprocessing output changes for the same settings (2: file list in meta)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- intensity


def intensity_settings(data: Any, modality_name: str) -> dict[str, Any]:
    """``data.intensity`` with the overrides of ``data.intensity_by_modality[modality_name]``."""
    base = dict(data.intensity)
    over = dict(data.intensity_by_modality).get(modality_name)
    if over:
        base.update(dict(over))
    out = {
        "mode": str(base["mode"]),
        "window": [float(v) for v in base["window"]],
        "percentiles": [float(v) for v in base["percentiles"]],
    }
    if out["mode"] not in ("minmax", "window", "percentile", "zscore", "none"):
        raise DataError(
            f"intensity mode {out['mode']!r} for {modality_name}: expected minmax, window, "
            "percentile, zscore or none."
        )
    return out


def _rescale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # constant volume: MONAI ScaleIntensity gives zeros
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def scale_intensity(image: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """Scale a float32 image per ``settings`` (see the module docstring); float32 out."""
    x = np.asarray(image, np.float32)
    mode = settings["mode"]
    if mode == "minmax":
        out = _rescale(x, float(x.min()), float(x.max()))
    elif mode == "window":
        a, b = settings["window"]
        out = _rescale(np.clip(x, a, b), a, b)
    elif mode == "percentile":
        a, b = np.percentile(x, settings["percentiles"])
        out = _rescale(np.clip(x, a, b), float(a), float(b))
    elif mode == "zscore":
        std = float(x.std())
        out = (x - x.mean()) / (std if std > 0 else 1.0)
    else:
        out = x
    return np.asarray(out, np.float32)


# ------------------------------------------------------------------------------- one volume, checks


@dataclasses.dataclass(frozen=True)
class Task:
    """One unique volume to check or preprocess (picklable for the process pool)."""

    entry: Entry
    modality_name: str
    needs_foreground: bool
    codes: dict[int, int]
    affine_atol: float
    spacing: tuple[float, ...]
    roi: tuple[int, int, int]
    intensity: dict[str, Any]
    fingerprint: str = "stat"

    def settings(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "modality": self.entry.modality,
            "codes": sorted(self.codes.items()),
            "spacing": list(self.spacing),
            "roi": list(self.roi),
            "intensity": self.intensity,
        }


def _load_checked(
    task: Task, warnings: list[str] | None = None
) -> tuple[list[str], np.ndarray | None, Geometry | None, np.ndarray | None]:
    """Load image and label once -> (every problem, image, image geometry, label as class ids);
    doubts that do not stop a volume's use are appended to ``warnings`` (when a list is given)."""
    e = task.entry
    problems = []
    image = image_geom = label = label_geom = None
    try:
        image, image_geom = load_image(e.image)
    except DataError as err:
        problems.append(str(err))
    if e.label is not None:
        try:
            raw, label_geom = load_label(e.label)
            label = map_label_codes(raw, task.codes, e.label)
            del raw
        except DataError as err:
            problems.append(str(err))
    if image_geom is not None and label_geom is not None:
        try:
            check_pair(e.image, image_geom, e.label, label_geom, task.affine_atol)
        except DataError as err:
            problems.append(str(err))
    if image is not None and image.size and image.min() == image.max():
        value = f"{float(image.flat[0]):g}"
        if task.needs_foreground:
            problems.append(
                f"{e.image}: image is constant (every voxel = {value}); nothing to learn from. Remove "
                "it from the training list or fix the file."
            )
        elif warnings is not None:
            warnings.append(
                f"{e.image}: image is constant (every voxel = {value}); its prediction means nothing. "
                "Check the file."
            )
    if label is not None and not label.any():
        if task.needs_foreground:
            problems.append(
                f"{e.label}: label has no foreground voxels; a training volume needs at least one "
                "labelled voxel (remove it from the training list or fix the label)."
            )
        elif warnings is not None:
            warnings.append(
                f"{e.label}: {e.split} label has no foreground: its Dice will be NaN (left out of the "
                "Dice means). Check the label, or drop the volume from the list."
            )
    return problems, image, image_geom, label


def check_volume(task: Task, warnings: list[str] | None = None) -> list[str]:
    """Every problem of one volume (each message names the file); empty if it is usable. Doubts that
    do not stop its use (e.g. an all-background validation label) go to ``warnings`` if given."""
    return _load_checked(task, warnings)[0]


def preprocess_volume(task: Task) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Load, check, reorient, resample, scale and pad one volume -> (image, label | None, meta)."""
    e = task.entry
    problems, image, geom, label = _load_checked(task)
    if problems:
        raise DataError("\n".join(problems))
    image, label, meta = preprocess_image(
        image, geom, label=label, spacing=task.spacing, roi=task.roi, intensity=task.intensity
    )
    if label is not None and task.needs_foreground and not (label > 0).any():
        raise DataError(
            f"{e.label}: no foreground voxel is left after resampling to {task.spacing} mm; "
            "use a finer data.spacing or drop the volume from the training list."
        )
    meta = {
        "source": {"image": e.image, "label": e.label},
        "modality_name": task.modality_name,
        "settings": task.settings(),
        **meta,
    }
    return image, label, meta


def preprocess_image(
    image: np.ndarray,
    geom: Geometry,
    *,
    spacing: Sequence[float],
    roi: Sequence[int],
    intensity: Mapping[str, Any],
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Steps 2-5 on arrays in memory -> (image, label | None, grid meta).

    The grid meta (``original``, ``ornt``, ``ras``, ``resampled``, ``pad``, ``affine``, ``spacing``,
    ``shape``) is what :func:`cinjax.data.geometry.invert_to_original` needs. The cache and prediction
    both run this, so a model sees the same input either way.
    """
    image, ras_affine, ornt = to_ras(image, geom.affine)
    if label is not None:
        label, _, _ = to_ras(label, geom.affine)
    ras_shape = tuple(image.shape)
    if spacing:
        res_affine, res_shape = resampled_grid(ras_affine, ras_shape, spacing)
    else:
        res_affine, res_shape = ras_affine, ras_shape
    image = resample(image, ras_affine, res_affine, res_shape, "linear")
    if label is not None:
        label = resample(label, ras_affine, res_affine, res_shape, "nearest")
    image = scale_intensity(image, intensity)
    pads = padding_to(res_shape, roi)
    image = np.pad(image, pads)
    if label is not None:
        label = np.pad(label, pads)
    final_affine = res_affine.copy()
    final_affine[:3, 3] -= res_affine[:3, :3] @ np.array([p[0] for p in pads], np.float64)
    meta = {
        "original": geom.to_json(),
        "ornt": np.asarray(ornt).tolist(),
        "ras": {"affine": ras_affine.tolist(), "shape": list(ras_shape)},
        "resampled": {"affine": res_affine.tolist(), "shape": list(res_shape)},
        "pad": [list(p) for p in pads],
        "affine": final_affine.tolist(),
        "spacing": list(Geometry(final_affine, image.shape).spacing),
        "shape": list(image.shape),
    }
    return image, label, meta


# ------------------------------------------------------------------------------------ cache, prepare


def _fingerprint(path: str | None, how: str) -> Any:
    if path is None:
        return None
    if how == "content":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return [os.path.abspath(path), h.hexdigest()]
    if how != "stat":
        raise DataError(f"data.cache_fingerprint={how!r}: expected 'stat' or 'content'.")
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def entry_hash(task: Task) -> str:
    """Hash of the source files and every setting that changes the cached result."""
    doc = {
        "image": _fingerprint(task.entry.image, task.fingerprint),
        "label": _fingerprint(task.entry.label, task.fingerprint),
        "settings": task.settings(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: str, task: Task, digest: str) -> str:
    return os.path.join(cache_dir, task.modality_name, f"{task.entry.name}-{digest[:16]}")


def _cached(
    task: Task, cache_dir: str, content: bool = False
) -> tuple[str, str, cache.VolumeRecord | None, str | None]:
    """(entry path, hash, record if a valid entry already exists, why an entry with this hash is
    damaged: see :func:`cache.check_entry`)."""
    digest = entry_hash(task)
    path = _cache_path(cache_dir, task, digest)
    try:
        if cache.read_meta(path).get("hash") == digest:
            damage = cache.check_entry(path, content)
            if damage is None:
                return path, digest, cache.load_record(path), None
            return path, digest, None, damage
    except (OSError, ValueError):  # absent or unreadable: (re)build
        pass
    return path, digest, None, None


def _sources_exist(task: Task) -> bool:
    """Both sources are files (anything else is left to :func:`check_volume` to explain)."""
    return all(p is None or os.path.isfile(p) for p in (task.entry.image, task.entry.label))


def _prepare_one(args: tuple[Task, str]) -> tuple[cache.VolumeRecord | None, bool, str | None]:
    """(record, written?, error) for one task; never raises for a bad input."""
    task, cache_dir = args
    try:
        if not _sources_exist(task):
            return None, False, "\n".join(check_volume(task))
        path, digest, record, _ = _cached(task, cache_dir)
        if record is not None:
            return record, False, None
        image, label, meta = preprocess_volume(task)
        meta["hash"] = digest
        key = f"{task.modality_name}/{task.entry.name}"
        record = _cached(task, cache_dir)[2]  # written meanwhile by another process sharing the cache?
        if record is not None:
            return record, False, None
        try:
            record = cache.write_entry(
                path, key=key, modality=task.entry.modality, image=image, label=label, meta=meta
            )
        except OSError:
            # Another process (e.g. a second host on a shared cache) finished the same entry first.
            record = _cached(task, cache_dir)[2]
            if record is None:
                raise
        return record, True, None
    except DataError as e:
        return None, False, str(e)


def data_section(config: Any) -> Any:
    """The ``data`` section of a full config, or the argument itself when it is one."""
    return config.data if "data" in config else config


def make_tasks(data: Any, entries: Mapping[str, Sequence[Entry]], splits: Sequence[str]) -> list[Task]:
    """One task per unique (image, label, modality) of the given splits, in datalist order."""
    names = modality_names(check_modalities(data.modalities))
    codes = label_code_map(data.label_codes, int(data.num_classes))
    if data.cache_fingerprint not in ("stat", "content"):
        raise DataError(f"data.cache_fingerprint={data.cache_fingerprint!r}: expected 'stat' or 'content'.")
    tasks: dict[tuple, Task] = {}
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}.")
        for e in entries[split]:
            key = (e.image, e.label, e.modality)
            fg = split == "training"
            if key in tasks:
                if fg and not tasks[key].needs_foreground:
                    tasks[key] = dataclasses.replace(tasks[key], needs_foreground=True)
                continue
            tasks[key] = Task(
                entry=e,
                modality_name=names[e.modality],
                needs_foreground=fg,
                codes=codes,
                affine_atol=float(data.affine_atol),
                spacing=tuple(float(s) for s in data.spacing),
                roi=tuple(int(r) for r in data.roi),
                intensity=intensity_settings(data, names[e.modality]),
                fingerprint=str(data.cache_fingerprint),
            )
    return list(tasks.values())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`_run` (queued work cancelled); ``done`` holds the results that were ready."""

    def __init__(self, done: list, message: str = "interrupted"):
        super().__init__(message)
        self.done = done


_in_task = False  # in a pool worker: whether a task is running (see _on_sigterm)


def _worker_init() -> None:
    """Pool worker set-up: Ctrl-C is the parent's to handle (no traceback per worker); the parent stops
    the workers with SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _in_task:
        raise KeyboardInterrupt  # unwinds the task, so write_entry removes its temporary directory
    os._exit(130)


def _in_worker(fn, item):
    """``fn(item)`` in a pool worker; a task stopped by SIGTERM ends the worker once it has cleaned up."""
    global _in_task
    _in_task = True
    try:
        return fn(item)
    except KeyboardInterrupt:
        os._exit(130)
    finally:
        _in_task = False


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop the workers now, not after the tasks already handed to them (see :func:`_on_sigterm`), and
    cancel the queued work; the pool's own thread reaps the workers."""
    for p in list(pool._processes.values()):  # Python >= 3.14: pool.terminate_workers()
        p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _run(fn, items: list, workers: int, desc: str, progress: bool) -> list:
    """``map(fn, items)`` in order, on a spawn-context process pool when ``workers > 1``.

    Ctrl-C cancels the rest and raises :class:`Interrupted` with the results that were ready.
    """
    bar = tqdm.tqdm(total=len(items), desc=desc, unit="vol", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            out = []
            try:
                for item in items:
                    out.append(fn(item))
                    bar.update()
            except KeyboardInterrupt:
                raise Interrupted(out) from None
            return out
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX threads
        with concurrent.futures.ProcessPoolExecutor(
            min(workers, len(items)), mp_context=ctx, initializer=_worker_init
        ) as pool:
            futures = []
            try:
                futures.extend(pool.submit(_in_worker, fn, item) for item in items)
                for _ in concurrent.futures.as_completed(futures):
                    bar.update()
            except KeyboardInterrupt:
                _stop(pool)
                ready = [f for f in futures if f.done() and not f.cancelled() and f.exception() is None]
                raise Interrupted([f.result() for f in ready]) from None
            return [f.result() for f in futures]
    finally:
        bar.close()


def cache_dir_of(data: Any) -> str:
    return os.path.abspath(os.path.expanduser(data.cache_dir or "~/.cache/cinjax/volumes"))


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Cached volumes ready for the loader: ``records[split][modality name]`` (every configured
    modality has a list, possibly empty), in datalist order."""

    records: dict[str, dict[str, list[cache.VolumeRecord]]]
    modalities: dict[str, int]
    label_codes: dict[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    union_name: str  # metrics report f"{union_name}_dice" (all foreground classes merged)
    cache_dir: str
    written: int = 0  # entries (re)built by this call; the rest were reused

    @property
    def modality_names(self) -> dict[int, str]:
        return modality_names(self.modalities)

    def missing_training_modalities(self) -> list[str]:
        """Names of the configured modalities without training volumes (ids ascending); needs the
        training split to have been prepared."""
        by_name = self.records["training"]
        return [name for name in sorted(self.modalities, key=self.modalities.get) if not by_name[name]]

    def all_records(self, split: str) -> list[cache.VolumeRecord]:
        """Every record of a split, modality by modality (ids ascending)."""
        by_name = self.records[split]
        return [r for name in sorted(by_name, key=self.modalities.get) for r in by_name[name]]


def _no_training_volumes(data: Any, entries: Mapping[str, Sequence[Entry]]) -> str | None:
    """The error for a dataset whose training split is empty, or None."""
    if entries["training"]:
        return None
    if data.layout == "json":
        where = f"data.json_lists={tuple(data.json_lists)}"
    else:
        where = f"data.layout={data.layout!r}, data.root={data.root!r}"
    return (
        f"the training split has no volumes ({where}); training needs at least one labelled volume: "
        "add entries to the datalists' 'training' lists."
    )


def prepare(
    config: Any,
    splits: Sequence[str] = ("training", "validation"),
    *,
    progress: bool = True,
    workers: int | None = None,
) -> PreparedData:
    """Preprocess (or reuse from the cache) every volume of ``splits``; raise listing all bad volumes.

    ``config`` is the full config (with a ``data`` section) or the data section itself.
    """
    data = data_section(config)
    modalities = check_modalities(data.modalities)
    entries = load_entries(data)
    empty = _no_training_volumes(data, entries) if "training" in splits else None
    if empty:
        raise DataError(empty)
    tasks = make_tasks(data, entries, splits)
    cache_dir = cache_dir_of(data)
    workers = int(data.preprocess_workers if workers is None else workers)
    # Reuse valid entries here (cheap), and only send the rest to the process pool.
    results: list[tuple[cache.VolumeRecord | None, bool, str | None]] = []
    todo = []
    for i, task in enumerate(tasks):
        record = None
        if _sources_exist(task):
            path, _, record, damage = _cached(task, cache_dir)
            if damage:
                log.warning(
                    "%s: cache entry of %s is damaged (%s); rebuilding it.", path, task.entry.image, damage
                )
        results.append((record, False, None))
        if record is None:
            todo.append(i)
    try:
        built = _run(_prepare_one, [(tasks[i], cache_dir) for i in todo], workers, "preprocess", progress)
    except Interrupted as e:
        cached = len(tasks) - len(todo) + sum(1 for record, _, _ in e.done if record is not None)
        raise Interrupted(
            e.done,
            f"interrupted; {cached} of {len(tasks)} entries are cached, the rest will be prepared next time.",
        ) from None
    for i, result in zip(todo, built):
        results[i] = result
    errors = [err for _, _, err in results if err]
    if errors:
        raise DataError(f"{len(errors)} bad volume(s); nothing was cached for them:\n" + "\n".join(errors))
    by_key = {(t.entry.image, t.entry.label, t.entry.modality): rec for t, (rec, _, _) in zip(tasks, results)}
    names = modality_names(modalities)
    records: dict[str, dict[str, list[cache.VolumeRecord]]] = {}
    for split in splits:
        records[split] = {name: [] for name in modalities}
        for e in entries[split]:
            records[split][names[e.modality]].append(by_key[(e.image, e.label, e.modality)])
    return PreparedData(
        records=records,
        modalities=modalities,
        label_codes=label_code_map(data.label_codes, int(data.num_classes)),
        num_classes=int(data.num_classes),
        class_names=tuple(data.class_names),
        union_name=str(data.union_name),
        cache_dir=cache_dir,
        written=sum(1 for _, w, _ in results if w),
    )


def _verify_one(args: tuple[Task, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one volume; a damaged cache entry of a good volume is a warning."""
    task, cache_dir = args
    warnings: list[str] = []
    problems = check_volume(task, warnings)
    if not problems:
        path, _, _, damage = _cached(task, cache_dir, content=True)
        if damage:
            warnings.append(
                f"{path}: the cache entry of {task.entry.image} is damaged ({damage}); prepare (or "
                "training) rebuilds it."
            )
    return problems, warnings


def verify(
    config: Any,
    splits: Sequence[str] = SPLITS,
    *,
    progress: bool = True,
    workers: int | None = None,
    warnings: list[str] | None = None,
) -> list[str]:
    """Every problem of every datalist and volume (messages name the file); empty when all is well.

    Doubts that do not stop training (a validation label without foreground, a damaged cache entry,
    which prepare rebuilds) are appended to ``warnings`` when a list is given.
    """
    data = data_section(config)
    problems: list[str] = []
    try:
        entries = collect_entries(data, problems)
        tasks = make_tasks(data, entries, splits)
    except DataError as e:
        return problems + [str(e)]
    empty = _no_training_volumes(data, entries) if "training" in splits else None
    if empty:
        problems.append(empty)
    workers = int(data.preprocess_workers if workers is None else workers)
    cache_dir = cache_dir_of(data)
    for found, doubts in _run(_verify_one, [(t, cache_dir) for t in tasks], workers, "verify", progress):
        problems.extend(found)
        if warnings is not None:
            warnings.extend(doubts)
    return problems
