"""What the conditional instance norms of a trained run learned, and what happens with the wrong id.

A conditional model differs between modalities only in its CIN tables: each norm layer holds one row of
``scale`` and one of ``bias`` per modality (``scale[M, C]``, ``bias[M, C]``). This command reads those
tables from a run's checkpoint and reports how far apart the modalities' rows are in every layer, and
then measures how much the segmentation relies on them: every labelled volume of a split is segmented
once with each modality id, so the Dice matrix ``[true modality][id used]`` shows the cost of running a
volume with another modality's tables::

    python -m cinjax.analyze_cin --run RUN_DIR [--checkpoint best|latest] [--split validation]
        [--out DIR] [--max_volumes N] [--tables_only]

It writes ``cin_analysis.json`` and three PNG figures (``tables.png``, ``distances.png``,
``wrong_modality.png``) to ``--out`` (default ``RUN_DIR/cin_analysis``). Python: :func:`analyze`.

The Dice part uses the run's preprocessed cache, as ``mode=eval`` does (the run's ``config.json`` names
the datalists and the cache; :func:`cinjax.runspec.data_for` forces the run's own preprocessing), and
scores the labels on the model's grid with :func:`cinjax.metrics.evaluate_volume` without the
largest-component post-processing. That is exactly what the run's own evaluation scores, so the
diagonal of the matrix reproduces ``eval/results.json`` of the same checkpoint; predicting the datalist
files with :class:`cinjax.predict.Predictor` instead would resample back to each input's grid and score
something slightly different.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cinjax import checkpointing, runspec
from cinjax.models.layers.norms import CIN_PARAMS, cin_layers

log = logging.getLogger(__name__)

JSON_NAME = "cin_analysis.json"
TABLES_PNG = "tables.png"
DISTANCES_PNG = "distances.png"
WRONG_MODALITY_PNG = "wrong_modality.png"
DEFAULT_OUT = "cin_analysis"
SPLITS = ("training", "validation", "test")


class CINAnalysisError(ValueError):
    """A run that cannot be analysed (no CIN tables, no labelled volumes, no data config)."""


# ------------------------------------------------------------------------------------------ tables


def cin_tables(params: Mapping[str, Any], num_modalities: int) -> dict[str, dict[str, np.ndarray]]:
    """Every CIN table of a params tree: ``{layer path: {"scale": (M, C), "bias": (M, C)}}`` (float64).

    The layers are :func:`cinjax.models.layers.norms.cin_layers`, in natural order of their names
    (``encoder2`` before ``encoder10``; Flax trees are sorted as strings).
    """
    found = cin_layers(params, num_modalities)
    order = sorted(found, key=_natural_key)
    return {k: {q: np.asarray(found[k][q], np.float64) for q in CIN_PARAMS} for k in order}


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders the digit runs of a name by value (``blocks_2`` before ``blocks_10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance of two rows normalised by sqrt(C): comparable across layers of any width."""
    return float(np.linalg.norm(a - b) / math.sqrt(a.size))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two rows (NaN when one is all zeros, e.g. an untrained bias row)."""
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else math.nan


def layer_numbers(scale: np.ndarray, bias: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """The JSON entry of one CIN layer: its tables, per-modality statistics, pairwise distances.

    ``names[i]`` is the modality of row ``i``. ``distance[q][a][b]``: RMS distance of the rows of
    modalities a and b of table ``q``; ``cosine[q][a][b]``: their cosine similarity.
    """
    tables = {"scale": scale, "bias": bias}
    entry: dict[str, Any] = {"channels": int(scale.shape[1])}
    entry.update({q: t.tolist() for q, t in tables.items()})
    entry["stats"] = {
        name: {f"{q}_{s}": float(getattr(np, s)(t[i])) for q, t in tables.items() for s in ("mean", "std")}
        for i, name in enumerate(names)
    }
    for what, fn in (("distance", _rms_distance), ("cosine", _cosine)):
        entry[what] = {
            q: {a: {b: fn(t[i], t[j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
            for q, t in tables.items()
        }
    return entry


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def _pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def summarize_layers(layers: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Which layers separate the modalities most: layers ranked by the mean pairwise distance (scale +
    bias), and for each pair of modalities the layer where its rows are farthest apart."""
    pairs = _pairs(names)
    ranking = []
    for layer, e in layers.items():
        mean = {
            q: float(np.mean([e["distance"][q][a][b] for a, b in pairs])) if pairs else math.nan
            for q in CIN_PARAMS
        }
        ranking.append({"layer": layer, **{f"{q}_distance": mean[q] for q in CIN_PARAMS}})
        ranking[-1]["combined"] = mean["scale"] + mean["bias"]
    ranking.sort(key=lambda r: (math.isnan(r["combined"]), -r["combined"]))
    by_pair = {}
    for a, b in pairs:
        by_pair[_pair_key(a, b)] = {
            q: max(
                ({"layer": layer, "distance": e["distance"][q][a][b]} for layer, e in layers.items()),
                key=lambda d: d["distance"],
            )
            for q in CIN_PARAMS
        }
    return {
        "num_layers": len(layers),
        "most_different_layer": ranking[0]["layer"] if ranking and pairs else None,
        "ranking": ranking,
        "by_pair": by_pair,
    }


# ---------------------------------------------------------------------------- wrong-modality Dice


def _run_config(run_dir: str) -> Any:
    """The run's ``config.json`` (with a ``data`` section) as a ConfigDict."""
    import ml_collections

    from cinjax import workdir

    path = os.path.join(runspec.run_root(run_dir), workdir.CONFIG)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CINAnalysisError(
            f"{path} does not exist: the wrong-modality Dice needs the run's datalists (pass --tables_only)."
        ) from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise CINAnalysisError(
            f"{path} names no datalists (a convert directory?): pass --tables_only for the tables alone."
        )
    return ml_collections.ConfigDict(doc)


def wrong_modality_dice(
    run_dir: str,
    spec: runspec.InferenceSpec,
    variables: checkpointing.InferenceVariables,
    *,
    split: str = "validation",
    max_volumes: int = 0,
) -> dict[str, Any]:
    """Segment every labelled volume of ``split`` with every modality id; mean foreground Dice per true
    modality and id used (``dice[true][used]``), and its drop versus the correct id.

    Volumes come from the run's cache with its preprocessing (see the module docstring); the model and
    windows are those of ``mode=eval``. ``max_volumes``: at most this many volumes per modality (0: all).
    """
    import tqdm

    from cinjax import build, inference, metrics
    from cinjax.data import cache

    config = _run_config(run_dir)
    build.generate_phantom(config.data)
    data = runspec.data_for(spec, config.data)
    prepared = build.prepare_data(data, (split,))
    names = spec.modality_names  # id -> name
    ids = sorted(names)
    records = []
    for i in ids:
        recs = [r for r in prepared.records[split].get(names[i], []) if r.has_label]
        records += recs[: max_volumes or None]
    if not records:
        raise CINAnalysisError(f"The {split!r} split of {run_dir} has no labelled volumes to score.")

    model = build.model_from_spec(spec)
    ev = config.get("eval") or {}
    window = inference.WindowSettings(
        roi=spec.roi,
        windows_per_call=build.check_windows_per_call(0),
        stitch_on_host=bool(ev.get("stitch_on_host", False)),
        **spec.window,
    )
    mesh = build.inference_mesh(window.windows_per_call)
    predict_fn = build.WindowPredictor(model, mesh).bind(variables.params, variables.model_state)
    foreground = tuple(spec.class_names)[1:]
    by_id: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    per_volume = []
    for rec in tqdm.tqdm(records, desc="wrong modality", unit="vol", leave=False):
        image, label = cache.read_volume(rec)
        spacing = tuple(float(s) for s in cache.read_meta(rec.path)["spacing"])
        row = {"key": rec.key, "modality": names[rec.modality], "mean_dice": {}}
        for used in ids:
            pred = inference.predict_volume(
                predict_fn, image[..., None], used, window, num_classes=spec.num_classes, mesh=mesh
            )
            volume = metrics.evaluate_volume(
                pred.labels,
                label,
                spacing=spacing,
                num_classes=spec.num_classes,
                class_names=foreground,
                key=rec.key,
                modality_name=names[rec.modality],
                union_name=spec.union_name,
                distances=False,
            )
            by_id[used].append(volume)
            row["mean_dice"][names[used]] = volume["mean_dice"]
        per_volume.append(row)

    union_key = f"{spec.union_name}_dice"
    summaries = {used: metrics.summarize(by_id[used], foreground, spec.union_name) for used in ids}
    dice: dict[str, dict[str, float]] = {}
    union: dict[str, dict[str, float]] = {}
    drop: dict[str, dict[str, float]] = {}
    counts = {}
    for true in ids:
        t = names[true]
        got = {names[u]: summaries[u]["modalities"].get(t) for u in ids}
        counts[t] = (got[t] or {}).get("n_volumes", 0)
        dice[t] = {u: (r["mean_dice"] if r else math.nan) for u, r in got.items()}
        union[t] = {u: (r[union_key] if r else math.nan) for u, r in got.items()}
        drop[t] = {u: dice[t][t] - d for u, d in dice[t].items()}
    return {
        "split": split,
        "modalities": [names[i] for i in ids],
        "n_volumes": counts,
        "postprocessing": False,
        "dice": dice,
        union_key: union,
        "drop": drop,
        "mean_wrong_drop": {
            t: float(np.nanmean([d for u, d in row.items() if u != t])) if len(ids) > 1 else math.nan
            for t, row in drop.items()
        },
        "volumes": per_volume,
    }


# ----------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas (no pyplot, no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_tables(layers: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: str) -> None:
    """``tables.png``: per layer (one row), the scale and bias tables as modality x channel heatmaps,
    coloured around their initial values (scale 1, bias 0)."""
    rows = max(1, len(layers))
    row_h = 0.35 * len(names) + 0.75
    fig = _figure(13.0, row_h * rows + 0.6)
    axes = fig.subplots(rows, 2, squeeze=False)
    for r, (layer, e) in enumerate(layers.items()):
        for c, (q, center) in enumerate((("scale", 1.0), ("bias", 0.0))):
            ax = axes[r][c]
            table = np.asarray(e[q], np.float64)
            half = float(np.max(np.abs(table - center))) or 1e-6
            im = ax.imshow(
                table,
                aspect="auto",
                cmap="coolwarm",
                vmin=center - half,
                vmax=center + half,
                interpolation="nearest",
            )
            ax.set_yticks(range(len(names)), labels=list(names), fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"{layer}  {q}  (C={table.shape[1]})", fontsize=7, loc="left")
            fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01).ax.tick_params(labelsize=6)
    axes[-1][0].set_xlabel("channel", fontsize=7)
    axes[-1][1].set_xlabel("channel", fontsize=7)
    fig.savefig(path)


def plot_distances(layers: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: str) -> None:
    """``distances.png``: per layer, the RMS distance between each pair of modalities' rows (scale and
    bias side by side, layers top to bottom in network order)."""
    pairs = _pairs(names) or [(names[0], names[0])]
    labels = list(layers)
    y = np.arange(len(labels))
    bar = 0.8 / len(pairs)
    fig = _figure(12.0, 0.28 * max(len(labels), 3) * max(1, len(pairs)) ** 0.5 + 1.4)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, q in zip(axes, CIN_PARAMS):
        for k, (a, b) in enumerate(pairs):
            values = [layers[layer]["distance"][q][a][b] for layer in labels]
            ax.barh(y - 0.4 + bar * (k + 0.5), values, height=bar, label=f"{a} vs {b}")
        ax.set_yticks(y, labels=labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{q}: ||row_a - row_b|| / sqrt(C)", fontsize=8)
        ax.set_title(f"CIN {q} distance between modalities", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path)


def plot_wrong_modality(result: Mapping[str, Any], path: str) -> None:
    """``wrong_modality.png``: the Dice matrix (true modality x id used), each cell annotated."""
    names = list(result["modalities"])
    matrix = np.array([[result["dice"][t][u] for u in names] for t in names], np.float64)
    size = 1.2 * len(names) + 2.2
    fig = _figure(size + 0.8, size)
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(matrix, nan=0.0), cmap="viridis", vmin=0.0, vmax=1.0)
    for i, j in itertools.product(range(len(names)), repeat=2):
        v = matrix[i, j]
        drop = matrix[i, i] - v
        text = "n/a" if math.isnan(v) else f"{v:.3f}" if i == j else f"{v:.3f}\n(drop {drop:+.3f})"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(names)), labels=names)
    ax.set_yticks(range(len(names)), labels=[f"{t} (n={result['n_volumes'][t]})" for t in names])
    ax.set_xlabel("modality id used")
    ax.set_ylabel("true modality")
    ax.set_title(f"mean foreground Dice on {result['split']}, true modality x id used", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.savefig(path)


# ------------------------------------------------------------------------------------------ analyze


def analyze(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    split: str = "validation",
    out_dir: str | os.PathLike[str] | None = None,
    max_volumes: int = 0,
    *,
    dice: bool = True,
) -> dict[str, Any]:
    """Analyse the CIN tables of a run's checkpoint (``best`` or ``latest``) and, with ``dice``, the
    wrong-modality Dice on ``split``; write ``cin_analysis.json`` and the PNGs to ``out_dir`` (default
    ``<run>/cin_analysis``) and return the JSON document."""
    from cinjax.metrics import json_safe

    run_dir = os.path.abspath(os.fspath(run_dir))
    if not os.path.isdir(run_dir):
        raise CINAnalysisError(f"Run directory {run_dir!r} does not exist.")
    if checkpoint not in (checkpointing.BEST_DIR, checkpointing.LATEST_DIR):
        raise CINAnalysisError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}.")
    if split not in SPLITS:
        raise CINAnalysisError(f"split must be one of {SPLITS}, got {split!r}.")
    if max_volumes < 0:
        raise CINAnalysisError(f"max_volumes must be >= 0 (0: all), got {max_volumes}.")
    spec = runspec.read(run_dir)
    variables = checkpointing.restore_inference_variables(run_dir, prefer=checkpoint)
    names = [spec.modality_names[i] for i in sorted(spec.modality_names)]
    tables = cin_tables(variables.params, len(names))
    if not tables:
        norms = {k: v for k, v in spec.model.items() if k.endswith("_norm")}
        raise CINAnalysisError(
            f"{run_dir}: the model has no conditional instance norm (no scale/bias tables of shape "
            f"({len(names)}, C)); its norms are {norms}: only conditional (instance_cond) runs have "
            "per-modality tables to analyse."
        )
    layers = {layer: layer_numbers(t["scale"], t["bias"], names) for layer, t in tables.items()}
    out = (
        os.path.abspath(os.fspath(out_dir))
        if out_dir
        else os.path.join(runspec.run_root(run_dir), DEFAULT_OUT)
    )
    os.makedirs(out, exist_ok=True)
    doc: dict[str, Any] = {
        "run": runspec.run_root(run_dir),
        "checkpoint": variables.directory,
        "step": variables.step,
        "modalities": {n: spec.modalities[n] for n in names},
        "model": spec.model.get("name"),
        "layers": layers,
        "summary": summarize_layers(layers, names),
        "out_dir": out,
        "figures": {},
    }
    plot_tables(layers, names, os.path.join(out, TABLES_PNG))
    plot_distances(layers, names, os.path.join(out, DISTANCES_PNG))
    doc["figures"]["tables"] = TABLES_PNG
    doc["figures"]["distances"] = DISTANCES_PNG
    if dice:
        wrong = wrong_modality_dice(run_dir, spec, variables, split=split, max_volumes=max_volumes)
        doc["wrong_modality"] = wrong
        doc["summary"]["mean_wrong_drop"] = wrong["mean_wrong_drop"]
        plot_wrong_modality(wrong, os.path.join(out, WRONG_MODALITY_PNG))
        doc["figures"]["wrong_modality"] = WRONG_MODALITY_PNG
    doc = json_safe(doc)
    path = os.path.join(out, JSON_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return doc


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cinjax.analyze_cin",
        allow_abbrev=False,
        description="Plot and measure the per-modality CIN tables of a conditional run, and the Dice "
        "drop when its volumes are segmented with the wrong modality id.",
    )
    p.add_argument("--run", required=True, help="Run directory (a training workdir).")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--split", default="validation", choices=SPLITS, help="Labelled split to score.")
    p.add_argument("--out", default=None, help="Output directory (default RUN/cin_analysis).")
    p.add_argument("--max_volumes", type=int, default=0, help="At most N volumes per modality (0: all).")
    p.add_argument("--tables_only", action="store_true", help="Skip the wrong-modality Dice.")
    return p


def run_cli(argv: Sequence[str]) -> dict[str, Any]:
    """``python -m cinjax.analyze_cin`` for a command line (without the program name)."""
    args = _parser().parse_args(list(argv))
    from cinjax.main import enable_compilation_cache

    enable_compilation_cache()
    doc = analyze(
        args.run,
        args.checkpoint,
        args.split,
        args.out,
        args.max_volumes,
        dice=not args.tables_only,
    )
    s = doc["summary"]
    print(f"{s['num_layers']} CIN layer(s); most different between modalities: {s['most_different_layer']}")
    if "wrong_modality" in doc:
        print(f"mean foreground Dice [true][id used]: {json.dumps(doc['wrong_modality']['dice'])}")
    print(f"wrote {JSON_NAME} and {', '.join(doc['figures'].values())} to {doc['out_dir']}", flush=True)
    return doc


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line of cause and exit status 2 for the errors a user can fix
    (``CINJAX_VERBOSE_ERRORS=1`` shows the traceback)."""
    from cinjax.data.io import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run_cli(sys.argv[1:] if argv is None else argv)
    except (DataError, runspec.RunSpecError, checkpointing.CheckpointNotFoundError, ValueError, OSError) as e:
        if os.environ.get("CINJAX_VERBOSE_ERRORS"):
            raise
        print(f"cinjax.analyze_cin: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
