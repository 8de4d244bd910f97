"""Export a trained model as ``jax.export`` artefacts that run without cinjax's model code.

    python -m cinjax.export --run RUN_DIR --out DIR [--checkpoint best|latest] [--platforms cpu,cuda]
                            [--dtype float32|bfloat16]

and, in a program that has jax but need not have flax or cinjax's models::

    fn = cinjax.export.load(DIR)            # the artefact of jax.default_backend()'s platform
    logits = fn(windows, modality)          # (N, *roi, C) fp32 windows, (N,) int32 ids -> (N, *roi, K)

``DIR`` holds

* ``model.<platform>.jaxexport``: one serialized :func:`jax.export.export` of the window function per
  platform, each traced with that platform's fast lowering (:data:`LOWERINGS`, :data:`BATCHING`), with a
  symbolic batch dimension ``b`` and the run's ROI and input channels fixed. It takes ``(variables, windows,
  modality)``: the weights are an argument, not constants baked into the program, so the artefact stays
  small and one ``weights.npz`` serves every platform.
* ``weights.npz``: the variables (``{"params": ..., **model_state}``), one array per leaf named by its
  :func:`jax.tree_util.keystr` key path, and ``__pytree__`` (JSON bytes: the leaf order, the dict keys of
  every path and the dtypes) to rebuild the nested dicts the artefact expects without model code.
* ``preprocessing.json``: what to do to an image before the model sees it (the run's
  :meth:`cinjax.runspec.InferenceSpec.preprocessing`).
* ``export.json``: what was exported (platforms, and those that failed with the reason), the input and
  output conventions (roi, in_channels, num_classes, class_names, modalities), the source run and
  checkpoint, the jax/jaxlib versions and the size of every artefact. Written last: a directory without
  it is an interrupted export.

Why: serving, or running on a machine without cinjax's training stack, needs only jax and these files,
and a deployed model cannot drift from the run it came from (the program is the traced model itself;
:func:`load` reproduces :meth:`cinjax.predict.Predictor.window_logits`, i.e.
:func:`cinjax.steps.predict_logits` on the restored variables, bit for bit in the tests on CPU). The
loader half of this module imports only jax, numpy and the standard library;
everything that needs the models is imported inside :func:`export`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 1
EXPORT_JSON = "export.json"
WEIGHTS = "weights.npz"
PREPROCESSING = "preprocessing.json"
PYTREE_KEY = "__pytree__"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16")
CHECKPOINTS = ("best", "latest")

# The lowering each platform's artefact is traced with (module fields a model lacks are skipped). CPU:
# what ``conv_impl="auto"`` / ``attention_impl="auto"`` pick on CPU (resolve_conv_impl,
# resolve_attention_impl; a test checks they still agree), fixed here so a CPU artefact exported on a GPU
# host gets them too. Accelerators: XLA's own 3D conv (cuDNN on GPU) and plain einsum attention.
_ACCELERATOR = {"conv_impl": "lax", "attention_impl": "plain"}
LOWERINGS: dict[str, dict[str, str]] = {
    "cpu": {"conv_impl": "cpu", "attention_impl": "blocked"},
    "cuda": _ACCELERATOR,
    "rocm": _ACCELERATOR,
    "tpu": _ACCELERATOR,
}
# How each artefact runs a batch of windows (see _window_fn): one at a time on CPU, batched elsewhere.
BATCHING = {"cpu": "map", "cuda": "vmap", "rocm": "vmap", "tpu": "vmap"}


class ExportError(RuntimeError):
    """No platform could be exported, or an export directory is unusable."""


def artefact_name(platform: str) -> str:
    """The file name of a platform's serialized artefact."""
    return f"model.{platform}.jaxexport"


def _require_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401  (jax.export (de)serialization needs it)
    except ImportError as e:
        raise ExportError(
            "jax.export serialization needs the `flatbuffers` package: pip install flatbuffers."
        ) from e


# -------------------------------------------------------------------------------------------- export


def _plain_tree(tree: Any, where: str = "variables") -> Any:
    """Nested mappings -> nested dicts of host arrays (the only containers :func:`load` rebuilds)."""
    if isinstance(tree, Mapping):
        return {str(k): _plain_tree(v, f"{where}[{k!r}]") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) or tree is None:
        kind = type(tree).__name__
        raise ExportError(f"{where} is a {kind}; exported variables hold only dicts of arrays.")
    return np.asarray(tree)


def _flatten(variables: dict[str, Any]) -> tuple[list[str], list[list[str]], list[np.ndarray]]:
    """``(names, paths, arrays)`` of the leaves in :func:`jax.tree_util` order."""
    names, paths, arrays = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names.append(jax.tree_util.keystr(path))
        paths.append([str(k.key) for k in path])
        arrays.append(np.asarray(leaf))
    return names, paths, arrays


def _window_fn(model: Any, batching: str) -> Any:
    """``(variables, windows, modality) -> fp32 logits``: :func:`cinjax.steps.predict_logits` traced for
    one window, run over the batch by :func:`jax.lax.map` (``"map"``) or :func:`jax.vmap` (``"vmap"``).

    The batch is symbolic in the artefact, and the CPU lowering cannot be traced with a symbolic batch:
    blocked window attention sizes its chunks from the concrete ``B * nW`` (a ``range`` over it), which
    fails with ``'_DimExpr' object cannot be interpreted as an integer``. Traced per window, the model
    sees ``B = 1`` (every shape concrete; the cpu/depth2d convolutions with their custom_vjp and the
    attention's ``lax.scan`` trace as usual) and the batch is put back around it:

    * CPU, ``lax.map``: one window at a time. The artefact's logits are bit-identical to
      :class:`cinjax.predict.Predictor`'s ``window_logits`` (two windows per device per call on CPU) in
      the tests, C-UNet and C-Swin-UNETR alike. It runs nearly as fast as a batched call there (two
      windows per call gain a median 9 % on the benchmark VM) and holds one window's activations whatever
      the batch.
    * accelerators, ``vmap``: one batched program, as the Predictor runs there (batching is what makes a
      GPU fast). vmap over a one-window call is the batched call: these models have no op that mixes
      windows (per-sample norms), and on CPU it is bit-identical to the batched ``predict_logits``.

    Batched and one-at-a-time logits differ by float rounding only, but a model may amplify that: the
    tiny test Swin-UNETR (whose deepest norms see 2 voxels) turns it into 1.5e-4.
    """
    from cinjax import steps

    def one(variables: Any, window: jax.Array, modality: jax.Array) -> jax.Array:
        return steps.predict_logits(variables, window[None], modality[None], model=model)[0]

    def fn(variables: Any, windows: jax.Array, modality: jax.Array) -> jax.Array:
        if batching == "map":
            return jax.lax.map(lambda wm: one(variables, *wm), (windows, modality))
        return jax.vmap(one, in_axes=(None, 0, 0))(variables, windows, modality)

    return fn


def _check_platforms(platforms: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(platforms, str):
        platforms = platforms.split(",")
    out = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
    unknown = [p for p in out if p not in PLATFORMS]
    if unknown or not out:
        raise ValueError(f"Unknown platform(s) {unknown or list(platforms)}; expected some of {PLATFORMS}.")
    return out


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: str, doc: Any) -> None:
    _write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())


def _write_weights(path: str, names: list[str], paths: list[list[str]], arrays: list[np.ndarray]) -> None:
    dtypes = [a.dtype.name for a in arrays]
    # numpy cannot read back extension dtypes (bfloat16) from .npy: store them as float32, cast on load.
    stored = [a if a.dtype.kind in "biuf" and a.dtype.isnative else a.astype(np.float32) for a in arrays]
    tree = json.dumps({"names": names, "paths": paths, "dtypes": dtypes}).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{PYTREE_KEY: np.frombuffer(tree, np.uint8)}, **dict(zip(names, stored)))
    os.replace(tmp, path)


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _lower_platforms(
    model: Any,
    variables: Any,
    roi: tuple[int, ...],
    channels: int,
    platforms: Sequence[str],
    num_classes: int,
    out: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Export and write one artefact per platform -> (artefact records, {failed platform: reason})."""
    (batch,) = jax.export.symbolic_shape("b")
    args = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables),
        jax.ShapeDtypeStruct((batch, *roi, channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    fields = set(getattr(model, "__dataclass_fields__", {}))
    artefacts: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for platform in platforms:
        lowering = {k: v for k, v in LOWERINGS[platform].items() if k in fields}
        try:
            fn = jax.jit(_window_fn(model.clone(**lowering), BATCHING[platform]))
            exported = jax.export.export(fn, platforms=[platform])(*args)
            blob = exported.serialize()
        except Exception as e:  # a platform this jax cannot lower for (e.g. no plugin): recorded
            failed[platform] = _reason(e)
            warnings.warn(f"cinjax.export: {platform} not exported: {failed[platform]}", stacklevel=3)
            continue
        classes = exported.out_avals[0].shape[-1]
        if classes != num_classes:
            raise ExportError(
                f"The model predicts {classes} classes but its inference.json says num_classes={num_classes}."
            )
        name = artefact_name(platform)
        _write_bytes(os.path.join(out, name), bytes(blob))
        artefacts[platform] = {
            "file": name,
            "bytes": len(blob),
            "lowering": lowering,
            "batching": BATCHING[platform],
        }
    return artefacts, failed


def export(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    platforms: str | Sequence[str] = ("cpu", "cuda"),
    dtype: str | None = None,
) -> dict[str, Any]:
    """Export the run ``run_dir`` (a training workdir or a converted-weights directory) into ``out_dir``.

    ``checkpoint`` is ``best`` or ``latest``; ``dtype`` the compute dtype (default the run's inference
    dtype). A platform that cannot be exported here is recorded in ``export.json`` with the reason and
    warned about; :class:`ExportError` when none could. Returns the ``export.json`` contents.
    """
    from cinjax import build, checkpointing, runspec

    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    platforms = _check_platforms(platforms)
    _require_flatbuffers()
    spec = runspec.read(run_dir)
    restored = checkpointing.restore_inference_variables(run_dir, prefer=checkpoint)
    variables = _plain_tree({"params": restored.params, **(restored.model_state or {})})
    model = build.model_from_spec(spec, dtype)
    roi, channels = tuple(int(r) for r in spec.roi), int(spec.in_channels)

    out = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out, exist_ok=True)
    info_path = os.path.join(out, EXPORT_JSON)
    if os.path.exists(info_path):  # never leave an old export.json describing new files
        os.remove(info_path)

    artefacts, failed = _lower_platforms(model, variables, roi, channels, platforms, spec.num_classes, out)
    if not artefacts:
        raise ExportError(
            "No platform could be exported: "
            + "; ".join(f"{p}: {r.splitlines()[0] if r else r}" for p, r in failed.items())
        )
    for stale in sorted(os.listdir(out)):  # artefacts of an earlier export with other platforms
        if stale.startswith("model.") and stale.endswith(".jaxexport"):
            if stale not in {a["file"] for a in artefacts.values()}:
                os.remove(os.path.join(out, stale))

    names, paths, arrays = _flatten(variables)
    weights_path = os.path.join(out, WEIGHTS)
    _write_weights(weights_path, names, paths, arrays)
    _write_json(os.path.join(out, PREPROCESSING), spec.preprocessing())

    import jaxlib

    info: dict[str, Any] = {
        "format": "cinjax.export",
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platforms": list(artefacts),
        "failed": failed,
        "artefacts": artefacts,
        "roi": list(roi),
        "in_channels": channels,
        "num_classes": int(spec.num_classes),
        "class_names": list(spec.class_names),
        "modalities": dict(spec.modalities),
        "model": spec.model.get("name"),
        "dtype": dtype or spec.dtype,
        "call": {
            "signature": "exported.call(variables, windows, modality) -> logits",
            "windows": {"shape": ["b", *roi, channels], "dtype": "float32"},
            "modality": {"shape": ["b"], "dtype": "int32"},
            "logits": {"shape": ["b", *roi, int(spec.num_classes)], "dtype": "float32"},
        },
        "weights": {
            "file": WEIGHTS,
            "bytes": os.path.getsize(weights_path),
            "arrays": len(arrays),
            "parameters": int(sum(a.size for a in arrays)),
        },
        "preprocessing": PREPROCESSING,
        "source_run": os.path.abspath(os.fspath(run_dir)),
        "checkpoint": {"prefer": checkpoint, "directory": restored.directory, "step": restored.step},
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    _write_json(info_path, info)
    return info


# ---------------------------------------------------------------------------------------------- load


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_weights(path: str) -> tuple[dict[str, Any], list[str]]:
    """The nested variables dict stored by :func:`export` and its leaf names (in leaf order)."""
    with np.load(path, allow_pickle=False) as npz:
        if PYTREE_KEY not in npz.files:
            raise ExportError(f"{path} has no {PYTREE_KEY} entry; it was not written by cinjax.export.")
        tree = json.loads(npz[PYTREE_KEY].tobytes())
        variables: dict[str, Any] = {}
        for name, keys, dtype in zip(tree["names"], tree["paths"], tree["dtypes"]):
            node = variables
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = npz[name].astype(jnp.dtype(dtype), copy=False)
    return variables, list(tree["names"])


class ExportedModel:
    """The window function of an export directory: ``fn(windows, modality) -> fp32 logits``.

    ``windows``: (N, *roi, in_channels) preprocessed windows (cast to float32); ``modality``: (N,) integer
    modality ids, or one id for all. Returns a :class:`jax.Array` (N, *roi, num_classes). Metadata:
    :attr:`info` (the ``export.json``), :attr:`preprocessing`, :attr:`platform`, :attr:`exported`,
    :attr:`directory`.
    """

    def __init__(self, out_dir: str | os.PathLike[str], platform: str | None = None):
        self.directory = os.path.abspath(os.fspath(out_dir))
        info_path = os.path.join(self.directory, EXPORT_JSON)
        if not os.path.isfile(info_path):
            raise FileNotFoundError(
                f"{os.fspath(out_dir)!r} is not an export directory: no {EXPORT_JSON} (write one with "
                "`python -m cinjax.export --run RUN_DIR --out DIR`)."
            )
        self.info: dict[str, Any] = _read_json(info_path)
        if int(self.info.get("version", 0)) > VERSION:
            raise ExportError(
                f"{info_path} has version {self.info['version']}; this cinjax reads up to {VERSION}."
            )
        self.platform = (platform or jax.export.default_export_platform()).lower()
        available = list(self.info.get("platforms", []))
        if self.platform not in available:
            why = self.info.get("failed", {}).get(self.platform)
            raise ValueError(
                f"{self.directory} has no {self.platform} artefact; available: {available}"
                + (f" ({self.platform} failed to export: {why.splitlines()[0]})" if why else "")
                + ". Pass platform= one of them, or export again with --platforms including it."
            )
        _require_flatbuffers()
        with open(os.path.join(self.directory, self.info["artefacts"][self.platform]["file"]), "rb") as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        self.preprocessing: dict[str, Any] = _read_json(
            os.path.join(self.directory, self.info.get("preprocessing", PREPROCESSING))
        )
        self.roi = tuple(int(r) for r in self.info["roi"])
        self.in_channels = int(self.info["in_channels"])
        self.num_classes = int(self.info["num_classes"])
        self.class_names = tuple(self.info["class_names"])
        self.modalities = {str(k): int(v) for k, v in self.info["modalities"].items()}
        variables, _ = _read_weights(os.path.join(self.directory, self.info["weights"]["file"]))
        self._check_weights(variables)
        self.variables = jax.device_put(variables)
        self._call = jax.jit(self.exported.call)

    def _check_weights(self, variables: dict[str, Any]) -> None:
        want = self.exported.in_tree
        got = jax.tree_util.tree_structure(((variables, 0, 0), {}))
        leaves = jax.tree.leaves(variables)
        avals = self.exported.in_avals[: len(leaves)]
        bad = got != want or any(
            tuple(a.shape) != tuple(v.shape) or a.dtype != v.dtype for a, v in zip(avals, leaves)
        )
        if bad:
            raise ExportError(
                f"{WEIGHTS} in {self.directory} does not match {artefact_name(self.platform)} "
                "(written by different exports?): export the run again."
            )

    def __repr__(self) -> str:
        return (
            f"ExportedModel({self.directory!r}, platform={self.platform!r}, roi={self.roi}, "
            f"in_channels={self.in_channels}, num_classes={self.num_classes})"
        )

    def __call__(self, windows: Any, modality: Any) -> jax.Array:
        shape = tuple(np.shape(windows))
        want = (*self.roi, self.in_channels)
        if len(shape) != 5 or shape[1:] != want or shape[0] < 1:
            raise ValueError(
                f"windows must be (N, {', '.join(map(str, want))}): N >= 1 preprocessed windows of the "
                f"exported ROI {self.roi} with {self.in_channels} channel(s); got shape {shape}."
            )
        ids = np.asarray(modality)
        if ids.ndim == 0:  # one id for every window
            ids = np.full((shape[0],), ids)
        if ids.shape != (shape[0],):
            raise ValueError(
                f"modality must hold one id per window, shape ({shape[0]},); got shape {ids.shape}."
            )
        if ids.dtype.kind not in "iu":
            raise ValueError(f"modality must hold integer ids ({self.modalities}); got dtype {ids.dtype}.")
        unknown = sorted(set(ids.tolist()) - set(self.modalities.values()))
        if unknown:
            raise ValueError(f"Unknown modality id(s) {unknown}; this model knows {self.modalities}.")
        if isinstance(windows, jax.Array):
            windows = windows.astype(jnp.float32)
        else:
            windows = np.asarray(windows, np.float32)
        return self._call(self.variables, windows, ids.astype(np.int32))


def load(out_dir: str | os.PathLike[str], platform: str | None = None) -> ExportedModel:
    """The window function of the export directory ``out_dir`` for ``platform`` (default the platform of
    :func:`jax.default_backend`): ``fn(windows, modality) -> fp32 logits (N, *roi, K)``, equal to
    :func:`cinjax.steps.predict_logits` on the exported variables. Uses only the files in ``out_dir``
    (no model code); ``fn.info`` and ``fn.preprocessing`` hold ``export.json`` and
    ``preprocessing.json``."""
    return ExportedModel(out_dir, platform)


# ----------------------------------------------------------------------------------------------- CLI


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cinjax.export",
        description="Export a run as jax.export artefacts (+ weights.npz, preprocessing.json, export.json).",
    )
    parser.add_argument("--run", required=True, help="training workdir or `cinjax.convert` directory")
    parser.add_argument("--out", required=True, help="directory to write the export into")
    parser.add_argument("--checkpoint", default="best", choices=CHECKPOINTS)
    parser.add_argument("--platforms", default="cpu,cuda", help=f"comma-separated, of {','.join(PLATFORMS)}")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype (default: the run's)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cinjax.export: ", category=UserWarning)
            info = export(
                args.run, args.out, checkpoint=args.checkpoint, platforms=args.platforms, dtype=args.dtype
            )
    except (ValueError, OSError, ExportError) as e:
        print(f"cinjax.export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    ckpt = info["checkpoint"]
    source = ckpt["directory"] + (f" step {ckpt['step']}" if ckpt["step"] is not None else "")
    if source == info["source_run"]:
        source += " (converted weights)"
    print(f"Exported {source} to {out}:")
    files = [(a["file"], a["bytes"], f"{p} artefact") for p, a in info["artefacts"].items()]
    files += [(WEIGHTS, info["weights"]["bytes"], f"{info['weights']['parameters']:,} parameters")]
    files += [(f, os.path.getsize(os.path.join(out, f)), "") for f in (PREPROCESSING, EXPORT_JSON)]
    for name, size, what in files:
        print(f"  {name:<24} {_size(size):>10}  {what}".rstrip())
    for platform, reason in info["failed"].items():
        print(f"  {platform}: not exported: {reason.splitlines()[0] if reason else reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
