"""A resumable grid of training runs (variant x seed) through the real CLI, and its report.

Each *cell* is one or more phases, each a ``python -m cinjax.main`` run in its own workdir under
``OUT/runs/<variant>/seed<k>/``; the last phase's final evaluation (``eval/results.json``) is the cell's
result. A finished cell leaves ``cell.json`` and is never rerun; an interrupted one resumes from its
checkpoints (the CLI resumes by itself). The report is JSON (one entry per seed with its ``seed``, and
mean ± std over seeds per modality and class), Markdown and a bar chart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Phase:
    """One CLI run: a config string and its ``--config.*`` overrides (without the leading ``--``)."""

    config: str
    overrides: tuple[str, ...] = ()
    init_from_previous: bool = False  # start from the previous phase's weights (finetune.init_from)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    description: str
    phases: tuple[Phase, ...]


def _cli(phase: Phase, workdir: str, extra: Sequence[str], log_path: str, previous: str | None) -> None:
    args = [sys.executable, "-m", "cinjax.main", "--config", phase.config, f"--workdir={workdir}"]
    args += [f"--{o}" for o in (*phase.overrides, *extra)]
    if phase.init_from_previous:
        args.append(f"--config.finetune.init_from={previous}")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "a") as log:
        log.write(" ".join(args) + "\n")
        log.flush()
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}); see {log_path}.")


def _cell_result(results: dict[str, Any], union_name: str) -> dict[str, Any]:
    out = {}
    for name, r in results["modalities"].items():
        out[name] = {
            "mean_dice": r["mean_dice"],
            "mean_hd95_mm": r.get("mean_hd95_mm"),
            f"{union_name}_dice": r.get(f"{union_name}_dice"),
            "classes": {c: v["dice"] for c, v in r["classes"].items()},
        }
    return out


def run_cell(
    out_dir: str, variant: Variant, seed: int, extra: Sequence[str], union_name: str, run: bool = True
) -> dict[str, Any] | None:
    """Run (or resume, or read back) one cell; returns ``{"seed", "wall_s", "modalities"}`` (None for an
    unfinished cell when ``run`` is False)."""
    cell_dir = os.path.join(out_dir, "runs", variant.name, f"seed{seed}")
    marker = os.path.join(cell_dir, "cell.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    if not run:
        return None
    os.makedirs(cell_dir, exist_ok=True)
    start = time.perf_counter()
    previous = None
    for i, phase in enumerate(variant.phases):
        workdir = os.path.join(cell_dir, f"phase{i}")
        _cli(phase, workdir, (*extra, f"config.seed={seed}"), os.path.join(cell_dir, "log.txt"), previous)
        previous = workdir
    with open(os.path.join(previous, "eval", "results.json")) as f:
        results = json.load(f)
    cell = {
        "seed": seed,
        "wall_s": round(time.perf_counter() - start, 1),
        "step": results.get("step"),
        "modalities": _cell_result(results, union_name),
    }
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cell, f, indent=1)
    os.replace(tmp, marker)
    return cell


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarize(cells: Sequence[dict[str, Any]], union_name: str) -> dict[str, Any]:
    """Mean ± std (population std over seeds) per modality of every reported number."""
    out = {}
    for name in cells[0]["modalities"]:
        per = [c["modalities"][name] for c in cells]
        out[name] = {
            k: _mean_std([p[k] for p in per]) for k in ("mean_dice", "mean_hd95_mm", f"{union_name}_dice")
        }
        out[name]["classes"] = {c: _mean_std([p["classes"][c] for p in per]) for c in per[0]["classes"]}
    return out


def _fmt(s: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def markdown(report: dict[str, Any], union_name: str) -> str:
    """Tables: mean Dice / union Dice / HD95 per modality, then Dice per class of each modality."""
    variants = report["variants"]
    names = list(next(iter(variants.values()))["summary"])
    head = ["variant", "seeds"]
    head += [f"{m} {k}" for m in names for k in ("Dice", f"{union_name} Dice", "HD95 mm")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v, entry in variants.items():
        s = entry["summary"]
        row = [v, str(len(entry["cells"]))]
        for m in names:
            row += [
                _fmt(s[m]["mean_dice"]),
                _fmt(s[m][f"{union_name}_dice"]),
                _fmt(s[m]["mean_hd95_mm"], 1, 1),
            ]
        lines.append("| " + " | ".join(row) + " |")
    for m in names:
        classes = list(next(iter(variants.values()))["summary"][m]["classes"])
        lines += ["", f"Dice per class, {m} (mean ± std over seeds):", ""]
        lines += ["| variant | " + " | ".join(classes) + " |", "|" + " --- |" * (len(classes) + 1)]
        for v, entry in variants.items():
            cls = entry["summary"][m]["classes"]
            lines.append(f"| {v} | " + " | ".join(_fmt(cls[c]) for c in classes) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: str, title: str) -> None:
    """Mean foreground Dice per variant and modality, error bars one std over seeds (the number of
    seeds is shown per variant when it differs)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    variants = list(report["variants"])
    names = list(report["variants"][variants[0]]["summary"])
    fig = Figure(figsize=(max(6.0, 1.1 * len(variants) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(names)
    x = np.arange(len(variants))
    for i, m in enumerate(names):
        stats = [report["variants"][v]["summary"][m]["mean_dice"] for v in variants]
        means = [s["mean"] or 0.0 for s in stats]
        stds = [s["std"] or 0.0 for s in stats]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=m)
    counts = [len(report["variants"][v]["cells"]) for v in variants]
    labels = variants if len(set(counts)) == 1 else [f"{v} (n={n})" for v, n in zip(variants, counts)]
    ax.set_xticks(x, labels, rotation=25, ha="right")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


def run_study(
    out_dir: str,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    extra: Sequence[str],
    union_name: str,
    meta: dict[str, Any],
    title: str,
    stem: str,
    report_only: bool = False,
) -> dict[str, Any]:
    """Every (variant, seed) cell, then ``OUT/<stem>.json``, ``.md`` and ``.png``. ``report_only``: run
    nothing, report the finished cells (a variant's ``seeds`` lists those it has)."""
    start = time.perf_counter()
    report = dict(meta, seeds=list(seeds), variants={})
    for variant in variants:
        cells = []
        for seed in seeds:
            cell = run_cell(out_dir, variant, seed, extra, union_name, run=not report_only)
            if cell is None:
                continue
            cells.append(cell)
            means = {m: round(r["mean_dice"], 3) for m, r in cell["modalities"].items()}
            print(f"{variant.name} seed {seed}: mean Dice {means} ({cell['wall_s']:.0f} s)", flush=True)
        if not cells:
            continue
        report["variants"][variant.name] = {
            "description": variant.description,
            "seeds": [c["seed"] for c in cells],
            "phases": [dataclasses.asdict(p) for p in variant.phases],
            "cells": cells,
            "summary": summarize(cells, union_name),
        }
    report["wall_s_this_invocation"] = round(time.perf_counter() - start, 1)
    report["wall_s_cells"] = round(
        sum(c["wall_s"] for v in report["variants"].values() for c in v["cells"]), 1
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown(report, union_name))
    bar_chart(report, os.path.join(out_dir, f"{stem}.png"), title)
    return report


def choose(
    parser: argparse.ArgumentParser, variants: Sequence[Variant], names: str, seeds: str
) -> tuple[list[Variant], list[int]]:
    """The ``--variants`` subset (comma-separated, in the given order; "" : all) and the ``--seeds``
    list of a study command; bad values end the command with the parser's usage error."""
    chosen = list(variants)
    if names:
        known = {v.name: v for v in chosen}
        wanted = [w.strip() for w in names.split(",") if w.strip()]
        if unknown := [w for w in wanted if w not in known]:
            parser.error(f"unknown variants {unknown}; choose from {list(known)}")
        chosen = [known[w] for w in wanted]
    try:
        return chosen, [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {seeds!r}")
