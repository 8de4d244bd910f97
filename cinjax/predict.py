"""Prediction from a run directory: label maps in each input's own geometry, with the dataset's codes.

A run directory says how its model was trained (:mod:`cinjax.runspec`), so nothing but the run and the
images is needed::

    python -m cinjax.predict --run RUN_DIR --input PATH --output OUT_DIR [--modality NAME] [--tta]
        [--probabilities] [--checkpoint best|latest] [--ensemble RUN_DIR ...]

``PATH`` is a NIfTI file, a folder of them or a datalist JSON (``--split``, default ``test``). The
modality of each input comes from ``--modality``, from ``--modality_map`` (a JSON ``{file name:
modality}``), from the datalist, or from a file name that starts with a modality name (``ct_…``,
``mr_…``). Each input gives ``OUT_DIR/<name>.nii.gz`` (``…_image`` → ``…_label``): the model's
preprocessing undone, uint16 label codes, the input's shape and affine; ``--probabilities`` adds
``OUT_DIR/probabilities/<name>.nii.gz`` (float16, one channel per class). Nothing is written into the
run directory or a preprocessing cache. With several processes (``--coordinator_address``, SLURM) each
predicts its share of the inputs.

Python: ``Predictor.from_run(run_dir, checkpoint="best")``; ``.predict(image, modality, affine=None)``;
``.window_logits(windows, modality)``. ``mode=predict`` of ``cinjax.main`` (and ``predict.after_train``)
runs the same predictor and writes ``<workdir>/predictions/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from cinjax import build, checkpointing, distributed, inference, postprocess, runspec
from cinjax.data import datalist, geometry
from cinjax.data.io import DataError, Geometry, load_image, write_nifti
from cinjax.data.preprocess import preprocess_image
from cinjax.runspec import InferenceSpec

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
PROBABILITIES = "probabilities"


def output_name(source: str) -> str:
    """The prediction's file name for a source image: ``…image…`` → ``…label….nii.gz``."""
    base = os.path.basename(source)
    for ext in NIFTI_EXTENSIONS:
        if base.endswith(ext):
            base = base[: -len(ext)]
    out = base.replace("image", "label") if "image" in base else base + "_label"
    return out + ".nii.gz"


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a predictor: its compiled window function with its variables bound."""

    predict_fn: inference.PredictFn
    source: str  # the checkpoint directory
    step: int | None


def _compatible(first: InferenceSpec, other: InferenceSpec, where: str) -> None:
    """Ensemble members must agree on everything but the model."""
    keys = ("modalities", "num_classes", "class_names", "label_codes", "spacing", "roi", "intensity")
    differ = [k for k in keys if getattr(first, k) != getattr(other, k)]
    if differ:
        raise runspec.RunSpecError(
            f"Ensemble member {where} differs from the first run in {differ}: members must share the "
            "preprocessing and classes (they may differ in the model)."
        )


class Predictor:
    """A trained model (or an ensemble) with the preprocessing and conventions it was trained with.

    ``tta_axes``: mirroring test-time augmentation over every subset of these spatial axes (``(0, 1,
    2)``: all 8 flips), inside the batched window program. An ensemble averages the members' softmax.
    Windows go ``windows_per_call`` at a time over all local devices (0: two per device on CPU, 4+ on
    accelerators). The largest-component post-processing recorded in the run is applied unless
    ``postprocess=False``.
    """

    def __init__(
        self,
        spec: InferenceSpec,
        models: Sequence[tuple[Any, Any, Any, str, int | None]],
        *,
        tta_axes: Sequence[int] | None = None,
        windows_per_call: int = 0,
        postprocess: bool = True,
    ):
        if not models:
            raise ValueError("A predictor needs at least one model.")
        self.spec = spec
        self.flips = build.tta_flips(tta_axes)
        wpc = build.check_windows_per_call(windows_per_call)
        self.window = inference.WindowSettings(roi=spec.roi, windows_per_call=wpc, **spec.window)
        self.mesh = build.inference_mesh(wpc)
        self.postprocess = postprocess
        self.members = []
        for model, params, model_state, source, step in models:
            fn = build.WindowPredictor(model, self.mesh, self.flips).bind(params, model_state)
            self.members.append(Member(fn, source, step))
        self._codes = np.asarray(spec.class_to_code(), np.int64)
        if self._codes.max() > np.iinfo(np.uint16).max:
            raise ValueError("Label codes do not fit a uint16 NIfTI.")

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        checkpoint: str = "best",
        *,
        ensemble: Sequence[str | os.PathLike[str]] = (),
        tta_axes: Sequence[int] | None = None,
        windows_per_call: int = 0,
        dtype: str | None = None,
        postprocess: bool = True,
    ) -> Predictor:
        """The predictor of a run directory (a training workdir, a checkpoint inside one, or a
        ``python -m cinjax.convert`` directory), ``checkpoint`` ``best`` (falls back to ``latest``) or
        ``latest``; ``ensemble``: more runs (or checkpoints) whose softmax is averaged with it."""
        if checkpoint not in (checkpointing.BEST_DIR, checkpointing.LATEST_DIR):
            raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}.")
        spec = runspec.read(run_dir)
        models = []
        for i, path in enumerate([run_dir, *ensemble]):
            member_spec = spec if i == 0 else runspec.read(path)
            if i:
                _compatible(spec, member_spec, os.fspath(path))
            variables = checkpointing.restore_inference_variables(path, prefer=checkpoint)
            logging.info("Predicting with %s (step %s).", variables.directory, variables.step)
            model = build.model_from_spec(member_spec, dtype)
            models.append(
                (model, variables.params, variables.model_state, variables.directory, variables.step)
            )
        return cls(
            spec, models, tta_axes=tta_axes, windows_per_call=windows_per_call, postprocess=postprocess
        )

    # ------------------------------------------------------------------------------------- windows

    def window_logits(
        self, windows: np.ndarray | jax.Array, modality: int | Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """fp32 logits ``(N, *roi, K)`` of preprocessed windows ``(N, *roi, C)`` (the first model of
        an ensemble, with the predictor's TTA); ``modality``: one id for all, or ``(N,)`` int ids."""
        windows = np.asarray(windows, np.float32)
        expected = (*self.spec.roi, self.spec.in_channels)
        if windows.ndim != 5 or tuple(windows.shape[1:]) != expected:
            raise ValueError(f"windows must be (N, {', '.join(map(str, expected))}); got {windows.shape}.")
        n = windows.shape[0]
        ids = np.broadcast_to(np.asarray(modality, np.int32), (n,))
        bad = sorted(set(ids.tolist()) - set(self.spec.modalities.values()))
        if bad:
            raise ValueError(f"modality ids {bad} are not among the run's {self.spec.modalities}.")
        wpc = self.window.windows_per_call
        fn = self.members[0].predict_fn
        out = []
        for first in range(0, n, wpc):
            chunk, mods = windows[first : first + wpc], ids[first : first + wpc]
            fill = wpc - len(chunk)
            if fill:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], fill, 0)])
                mods = np.concatenate([mods, np.repeat(mods[:1], fill)])
            out.append(np.asarray(fn(self._put(chunk), self._put(mods)))[: wpc - fill])
        return np.concatenate(out)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, distributed.data_sharding(self.mesh))

    # ------------------------------------------------------------------------------------- volumes

    def preprocess(
        self, image: np.ndarray, geom: Geometry, modality: int | str
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The run's preprocessing of one image -> (volume on the model's grid, its grid meta)."""
        name = self.spec.modality_names[self.spec.modality_id(modality)]
        volume, _, meta = preprocess_image(
            image, geom, spacing=self.spec.spacing, roi=self.spec.roi, intensity=self.spec.intensity[name]
        )
        return volume, meta

    def segment(self, volume: np.ndarray, modality: int | str, probabilities: bool = False) -> tuple:
        """Class ids (and softmax probabilities if asked) of a preprocessed volume, on its grid."""
        mid = self.spec.modality_id(modality)
        probs = None
        for member in self.members:
            logits = inference.sliding_window_inference(
                member.predict_fn,
                volume[..., None],
                mid,
                num_classes=self.spec.num_classes,
                mesh=self.mesh,
                **dataclasses.asdict(self.window),
            )
            if len(self.members) == 1 and not probabilities:
                labels = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.uint8)
                return self._postprocess(labels, mid), None
            p = jax.nn.softmax(jnp.asarray(logits), axis=-1)
            probs = p if probs is None else probs + p
        probs = probs / len(self.members)
        labels = np.asarray(jnp.argmax(probs, axis=-1)).astype(np.uint8)
        return self._postprocess(labels, mid), np.asarray(probs, np.float32)

    def _postprocess(self, labels: np.ndarray, modality: int) -> np.ndarray:
        classes = self.spec.largest_component_classes(modality) if self.postprocess else ()
        return postprocess.keep_largest_component(labels, classes) if classes else labels

    def predict(
        self,
        image: str | os.PathLike[str] | np.ndarray,
        modality: int | str,
        affine: np.ndarray | None = None,
        *,
        probabilities: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment one image (a NIfTI path, or a (D, H, W) array with its affine: identity if None).

        Returns the labels with the dataset's label codes (uint16) in the input's geometry, and with
        ``probabilities=True`` also the class probabilities ``(D, H, W, K)`` (float32) there.
        """
        if isinstance(image, (str, os.PathLike)):
            array, geom = load_image(os.fspath(image))
        else:
            array = np.asarray(image, np.float32)
            if array.ndim != 3:
                raise ValueError(f"image must be a (D, H, W) array, got shape {array.shape}.")
            geom = Geometry(np.eye(4) if affine is None else np.asarray(affine, np.float64), array.shape)
        volume, meta = self.preprocess(array, geom, modality)
        labels, probs = self.segment(volume, modality, probabilities)
        codes = self._codes[geometry.invert_to_original(labels, meta)].astype(np.uint16)
        if not probabilities:
            return codes
        return codes, geometry.invert_to_original(probs, meta, mode="linear")

    def predict_files(
        self,
        inputs: Sequence[tuple[str, int | str]],
        out_dir: str,
        *,
        probabilities: bool = False,
        progress: bool = True,
    ) -> list[str]:
        """Segment ``(image path, modality)`` inputs into ``out_dir`` (see the module docstring); with
        several processes each takes every ``process_count``-th input. Returns this process's files."""
        names = [output_name(path) for path, _ in inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"Several inputs would write the same prediction {dupes}; rename the inputs.")
        mine = list(zip(inputs, names))[jax.process_index() :: jax.process_count()]
        os.makedirs(out_dir, exist_ok=True)
        if probabilities:
            os.makedirs(os.path.join(out_dir, PROBABILITIES), exist_ok=True)
        written = []
        show = progress and distributed.is_main_process()
        for (path, modality), name in tqdm.tqdm(
            mine, desc="predict", unit="vol", disable=not show, leave=False
        ):
            image, geom = load_image(path)
            result = self.predict(image, modality, geom.affine, probabilities=probabilities)
            labels, probs = result if probabilities else (result, None)
            target = os.path.join(out_dir, name)
            write_nifti(target, labels, geom.affine)
            if probs is not None:
                write_nifti(os.path.join(out_dir, PROBABILITIES, name), probs.astype(np.float16), geom.affine)
            written.append(target)
        return written

    def describe(self) -> dict[str, Any]:
        """What this predictor runs (for the record written next to predictions)."""
        return {
            "members": [{"checkpoint": m.source, "step": m.step} for m in self.members],
            "tta_flips": [list(f) for f in self.flips],
            "windows_per_call": self.window.windows_per_call,
            "devices": jax.local_device_count(),
            "postprocessing": {m: list(c) for m, c in self.spec.postprocessing.items()}
            if self.postprocess
            else {},
        }


# ----------------------------------------------------------------------------------------- inputs


def _nifti_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(NIFTI_EXTENSIONS))


def _by_name(path: str, modalities: Mapping[str, int]) -> str | None:
    """The modality whose name starts the file name (``ct_train_1001_image`` -> ``CT``), if one does."""
    base = os.path.basename(path).lower()
    hits = [m for m in modalities if base.startswith(m.lower() + "_") or base.startswith(m.lower() + "-")]
    return hits[0] if len(hits) == 1 else None


def resolve_inputs(
    path: str,
    spec: InferenceSpec,
    *,
    modality: str | None = None,
    modality_map: Mapping[str, str] | None = None,
    split: str = "test",
) -> list[tuple[str, int]]:
    """``(image path, modality id)`` of every input of ``path`` (a NIfTI file, a folder, a datalist)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"Input {path!r} does not exist: pass a NIfTI file, a folder of them or a datalist.")
    if path.endswith(".json"):
        entries = datalist.read_datalist(path, None, spec.modalities)
        if modality is not None:
            logging.warning("--modality is ignored for a datalist: its entries name their modality.")
        if not entries[split]:
            have = {s: len(e) for s, e in entries.items() if e}
            raise DataError(f"{path}: the {split!r} split is empty (entries: {have}); pass --split.")
        return [(e.image, e.modality) for e in entries[split]]
    files = _nifti_files(path) if os.path.isdir(path) else [path]
    if not files:
        raise DataError(f"No .nii/.nii.gz files in {path!r}.")
    mapping = {os.path.basename(k): v for k, v in (modality_map or {}).items()}
    out, unknown = [], []
    for f in files:
        given = mapping.get(os.path.basename(f), modality) or _by_name(f, spec.modalities)
        if given is None:
            unknown.append(os.path.basename(f))
            continue
        out.append((f, spec.modality_id(given, f"{f}: modality")))
    if unknown:
        raise DataError(
            f"No modality for {unknown}: pass --modality ({'/'.join(spec.modalities)}), a --modality_map "
            "JSON {file name: modality}, or a datalist."
        )
    return out


# ------------------------------------------------------------------------------- mode=predict (main)


def _config_inputs(config: ml_collections.ConfigDict, spec: InferenceSpec) -> list[tuple[str, int]]:
    """The inputs of ``mode=predict``: ``predict.input_dir`` (modality ``predict.modality_name`` unless
    a file name says otherwise) or ``predict.split`` of the configured datalists."""
    pc = config.predict
    if pc.input_dir:
        folder = os.path.abspath(os.path.expanduser(pc.input_dir))
        if not os.path.isdir(folder):
            raise DataError(f"config.predict.input_dir={pc.input_dir!r} is not a directory.")
        return resolve_inputs(folder, spec, modality=pc.modality_name)
    names = datalist.modality_names(config.data.modalities)
    entries = datalist.load_entries(config.data)[pc.split]
    if not entries:
        raise DataError(f"No volumes to predict in split {pc.split!r} of the configured datalists.")
    return [(e.image, spec.modality_id(names[e.modality], e.image)) for e in entries]


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    predictor: Predictor | None = None,
) -> list[str]:
    """``mode=predict`` (or, after training, with the trained ``predictor``): segment the configured
    inputs into ``<workdir>/predictions/``; returns the paths this process wrote.

    The model and its preprocessing come from the run (``predict.checkpoint``: ``best`` / ``latest`` of
    the workdir, or another run or convert directory), not from ``config``; the run's records are not
    touched.
    """
    from cinjax.workdir import Workdir

    pc = config.predict
    run = Workdir(workdir)
    if predictor is None:
        run.check(int(config.train.min_free_gb * (1 << 30)))
        build.generate_phantom(config.data)
        source = run.root if pc.checkpoint in ("best", "latest") else pc.checkpoint
        predictor = Predictor.from_run(
            source,
            pc.checkpoint if pc.checkpoint in ("best", "latest") else "best",
            tta_axes=tuple(pc.tta_axes) if pc.tta else None,
            windows_per_call=config.eval.windows_per_call,
            dtype=config.eval.dtype or None,
            postprocess=pc.postprocess,
        )
    inputs = _config_inputs(config, predictor.spec)
    written = predictor.predict_files(inputs, run.predictions_dir, probabilities=pc.probabilities)
    logging.info("Wrote %d predictions to %s.", len(written), run.predictions_dir)
    return written


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cinjax.predict",
        allow_abbrev=False,
        description="Segment NIfTI images with a trained cinjax run (its own preprocessing).",
    )
    p.add_argument("--run", required=True, help="Run directory (training workdir or convert output).")
    p.add_argument("--input", required=True, help="A NIfTI file, a folder of them, or a datalist JSON.")
    p.add_argument("--output", required=True, help="Directory for <name>.nii.gz predictions.")
    p.add_argument("--modality", default=None, help="Modality name (or id) of every input.")
    p.add_argument("--modality_map", default=None, help="JSON file {file name: modality}.")
    p.add_argument("--split", default="test", help="Datalist split to predict (default: test).")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--ensemble", nargs="+", default=(), metavar="RUN_DIR", help="More runs or checkpoints.")
    p.add_argument("--tta", action="store_true", help="Mirroring TTA (all 8 flips; see --tta_axes).")
    p.add_argument("--tta_axes", default="0,1,2", help="Spatial axes whose flips --tta combines.")
    p.add_argument("--probabilities", action="store_true", help="Also write float16 class probabilities.")
    p.add_argument("--no_postprocess", action="store_true", help="Skip the run's largest-component filter.")
    p.add_argument("--windows_per_call", type=int, default=0, help="0: auto (a multiple of the devices).")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="Compute dtype.")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host).")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    return p


def run_cli(argv: Sequence[str]) -> list[str]:
    """``python -m cinjax.predict`` for a command line (without the program name)."""
    args = _parser().parse_args(list(argv))
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from cinjax.main import enable_compilation_cache

    enable_compilation_cache()
    tta = tuple(int(a) for a in args.tta_axes.split(",") if a.strip()) if args.tta else None
    predictor = Predictor.from_run(
        args.run,
        args.checkpoint,
        ensemble=args.ensemble,
        tta_axes=tta,
        windows_per_call=args.windows_per_call,
        dtype=args.dtype,
        postprocess=not args.no_postprocess,
    )
    modality_map = None
    if args.modality_map:
        with open(args.modality_map) as f:
            modality_map = json.load(f)
    inputs = resolve_inputs(
        args.input, predictor.spec, modality=args.modality, modality_map=modality_map, split=args.split
    )
    out = os.path.abspath(args.output)
    if os.path.realpath(out) == os.path.realpath(runspec.run_root(args.run)):
        raise DataError(f"--output {out!r} is the run directory; predictions go to a directory of their own.")
    written = predictor.predict_files(inputs, out, probabilities=args.probabilities)
    print(f"process {jax.process_index()}: {len(written)} prediction(s) on this process", flush=True)
    distributed.sync("predict_done")
    if distributed.is_main_process():
        print(f"wrote {len(inputs)} prediction(s) to {out} with {json.dumps(predictor.describe())}")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line of cause and exit status 1 for the errors a user can fix
    (``CINJAX_VERBOSE_ERRORS=1`` shows the traceback)."""
    import logging as py_logging

    py_logging.basicConfig(level=py_logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run_cli(sys.argv[1:] if argv is None else argv)
    except (DataError, runspec.RunSpecError, checkpointing.CheckpointNotFoundError, ValueError, OSError) as e:
        if os.environ.get("CINJAX_VERBOSE_ERRORS"):
            raise
        print(f"cinjax.predict: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
