"""Shared machinery of the PyTorch → cinjax weight converters: key maps and the strict load report.

A converter for one architecture is a list of :class:`ParamRule`: one cinjax parameter, the PyTorch
state-dict keys it is built from, and the function that builds it. :func:`apply_rules` runs the list
against a state dict and the model's abstract parameter tree and returns the params plus a
:class:`LoadReport` (loaded / missing / unexpected / mis-shaped keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

# Buffers that carry no learned state (recomputed deterministically in cinjax).
IGNORED_SUFFIXES = ("relative_position_index", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """One cinjax parameter (``path`` in the params tree) built by ``fn`` from PyTorch ``keys``."""

    path: tuple[str, ...]
    keys: tuple[str, ...]
    fn: Callable[..., np.ndarray]


@dataclasses.dataclass
class LoadReport:
    """What a conversion used, lacked, did not recognise, or could not fit."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )  # (keys, expected cinjax shape, shape built from the checkpoint)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} keys"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                lines.append(f"{len(items)} {name}: {shown}")
        for keys, want, got in self.mismatched[:20]:
            lines.append(f"mis-shaped {keys}: model expects {want}, checkpoint gives {got}")
        return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """A strict load found missing, unexpected or mis-shaped keys (the report is attached)."""

    def __init__(self, report: LoadReport):
        super().__init__(
            "Checkpoint does not match the model (pass strict=False to load what fits):\n" + str(report)
        )
        self.report = report


# --- layout conversions (PyTorch → channels-last Flax) ------------------------------------------


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """Conv3d weight (out, in, kd, kh, kw) → DHWIO."""
    return np.transpose(w, (2, 3, 4, 1, 0))


def linear(w: np.ndarray) -> np.ndarray:
    """Linear weight (out, in) → (in, out)."""
    return np.transpose(w)


def same(w: np.ndarray) -> np.ndarray:
    return np.asarray(w)


def stack_rows(*rows: np.ndarray) -> np.ndarray:
    """Per-modality vectors (CIN ``norms.<m>.weight``) → an (M, C) table."""
    return np.stack([np.asarray(r) for r in rows], axis=0)


# --- state-dict handling ------------------------------------------------------------------------


def normalize_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap ``{"state_dict": ...}``, strip ``model.`` / ``module.`` prefixes, convert to numpy."""
    sd = checkpoint
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            continue
        for prefix in ("module.", "model."):
            # Lightning stores the network as attribute `model`; DDP wraps it as `module`.
            while k.startswith(prefix):
                k = k[len(prefix) :]
        if hasattr(v, "detach"):  # torch tensor
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def apply_rules(
    rules: Iterable[ParamRule],
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping[str, Any],
    *,
    init_params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], LoadReport]:
    """Build a params tree from ``state_dict``; report missing / unexpected / mis-shaped keys.

    ``abstract_params`` gives the expected shapes (e.g. ``jax.eval_shape(model.init, ...)["params"]``).
    Parameters that cannot be built are taken from ``init_params`` when given (non-strict loads).
    """
    want = traverse_util.flatten_dict(dict(abstract_params))
    init = traverse_util.flatten_dict(dict(init_params)) if init_params is not None else {}
    report = LoadReport()
    built: dict[tuple[str, ...], np.ndarray] = {}
    used: set[str] = set()
    for e in rules:
        if e.path not in want:
            raise KeyError(f"converter bug: {e.path} is not a parameter of the model")
        absent = [k for k in e.keys if k not in state_dict]
        if absent:
            report.missing.extend(absent)
            used.update(k for k in e.keys if k in state_dict)
            continue
        used.update(e.keys)
        arr = np.asarray(e.fn(*(state_dict[k] for k in e.keys)), dtype=np.float32)
        shape = tuple(want[e.path].shape)
        if arr.shape != shape:
            report.mismatched.append((",".join(e.keys), shape, arr.shape))
            continue
        built[e.path] = arr
        report.loaded.extend(e.keys)
    uncovered = [p for p in want if p not in built and p not in {e.path for e in rules}]
    if uncovered:
        raise KeyError(f"converter bug: no entry for model parameters {uncovered[:5]}")
    report.unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES))
    params = {}
    for p in want:
        if p in built:
            params[p] = built[p]
        elif p in init:
            params[p] = np.asarray(init[p])
    return traverse_util.unflatten_dict(params), report
