"""What a run directory says about itself: everything inference needs, in ``inference.json``.

A training run writes it when it starts (from its config), ``python -m cinjax.convert`` writes it next
to converted weights, and prediction, export and the ``eval`` / ``predict`` modes read it, so a model is
always run with the preprocessing it was trained with (spacing, per-modality intensity scaling, ROI,
modality ids, label codes), whatever config is given at prediction time. The post-processing decision
taken on validation (:mod:`cinjax.postprocess`) is kept beside it in ``postprocessing.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from cinjax import workdir
from cinjax.data import datalist
from cinjax.data.preprocess import intensity_settings

VERSION = 1
log = logging.getLogger(__name__)


class RunSpecError(ValueError):
    """A directory is not a run directory, or its inference record is unusable."""


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """The preprocessing, model and output conventions of one trained model.

    ``label_codes`` maps each dataset label code to its class id (0 is background); predictions are
    written with the codes. ``intensity`` holds the scaling of each modality (by name). ``window`` holds
    the sliding-window placement and blending (``overlap``, ``blend``, ``sigma_scale``);
    the number of windows per call is chosen where the model runs. ``postprocessing`` maps a modality
    name to the class names whose largest connected component alone is kept.
    """

    model: dict[str, Any]
    dtype: str
    modalities: dict[str, int]
    num_classes: int
    class_names: tuple[str, ...]
    union_name: str
    label_codes: dict[int, int]
    spacing: tuple[float, ...]
    roi: tuple[int, int, int]
    intensity: dict[str, dict[str, Any]]
    window: dict[str, Any]
    in_channels: int = 1
    postprocessing: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> InferenceSpec:
        """The spec of a run trained with ``config`` (model, ``config.data``, ``config.eval``)."""
        data, ev = config.data, config.eval
        modalities = datalist.check_modalities(data.modalities)
        model = config.model.to_dict()
        model.setdefault("num_modalities", len(modalities))
        return cls(
            model=json.loads(json.dumps(model)),
            dtype=str(ev.dtype or config.train.dtype),
            modalities=modalities,
            num_classes=int(data.num_classes),
            class_names=tuple(str(n) for n in data.class_names),
            union_name=str(data.union_name),
            label_codes=datalist.label_code_map(data.label_codes, int(data.num_classes)),
            spacing=tuple(float(s) for s in data.spacing),
            roi=tuple(int(r) for r in data.roi),  # type: ignore[arg-type]
            intensity={name: intensity_settings(data, name) for name in modalities},
            window={
                "overlap": ev.overlap if isinstance(ev.overlap, float) else list(ev.overlap),
                "blend": str(ev.blend),
                "sigma_scale": float(ev.sigma_scale),
            },
        )

    def with_postprocessing(self, decision: Mapping[str, Any]) -> InferenceSpec:
        return dataclasses.replace(
            self, postprocessing={str(m): tuple(str(c) for c in cs) for m, cs in decision.items()}
        )

    # ---------------------------------------------------------------------------------- accessors

    @property
    def modality_names(self) -> dict[int, str]:
        return datalist.modality_names(self.modalities)

    def modality_id(self, modality: int | str, where: str = "modality") -> int:
        """An id or a name (case-insensitive) -> the id; unknown -> error listing the known ones."""
        return datalist.resolve_modality(modality, self.modalities, where)

    def class_to_code(self) -> list[int]:
        """Output label code of each class id (the inverse of ``label_codes``; background -> 0)."""
        out = [0] * self.num_classes
        for code, cls in sorted(self.label_codes.items(), reverse=True):
            out[cls] = code
        out[0] = 0
        return out

    def largest_component_classes(self, modality: int | str) -> tuple[int, ...]:
        """Class ids to reduce to their largest connected component for ``modality``."""
        name = self.modality_names[self.modality_id(modality)]
        return tuple(self.class_names.index(c) for c in self.postprocessing.get(name, ()))

    def preprocessing(self) -> dict[str, Any]:
        """Everything done to an image before the model sees it and to its output after (JSON)."""
        return {
            "modalities": self.modalities,
            "in_channels": self.in_channels,
            "orientation": "RAS (closest canonical), arrays indexed x, y, z",
            "spacing": list(self.spacing),
            "spacing_note": "resampled like MONAI Spacingd (trilinear image); [] keeps the grid",
            "intensity": self.intensity,
            "roi": list(self.roi),
            "pad": "constant 0, symmetric, to at least the ROI",
            "window": self.window,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "label_codes": {str(k): v for k, v in self.label_codes.items()},
            "postprocessing": {m: list(c) for m, c in self.postprocessing.items()},
        }

    # ------------------------------------------------------------------------------------- storage

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label_codes"] = {str(k): v for k, v in self.label_codes.items()}
        d["postprocessing"] = {m: list(c) for m, c in self.postprocessing.items()}
        return {"version": VERSION, **d}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "inference.json") -> InferenceSpec:
        if int(doc.get("version", 0)) > VERSION:
            raise RunSpecError(
                f"{where} has version {doc['version']}; this cinjax reads up to {VERSION}: upgrade cinjax."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)
        missing = [k for k in missing if k not in doc and k != "postprocessing"]
        if missing:
            raise RunSpecError(f"{where} lacks {missing}; it was not written by cinjax.")
        d = {k: v for k, v in doc.items() if k in fields}
        d["label_codes"] = {int(k): int(v) for k, v in d["label_codes"].items()}
        d["modalities"] = {str(k): int(v) for k, v in d["modalities"].items()}
        d["class_names"] = tuple(d["class_names"])
        d["spacing"] = tuple(float(s) for s in d["spacing"])
        d["roi"] = tuple(int(r) for r in d["roi"])
        d["postprocessing"] = {m: tuple(c) for m, c in d.get("postprocessing", {}).items()}
        return cls(**d)

    def write(self, run_dir: str | os.PathLike[str]) -> str:
        """Write ``<run_dir>/inference.json`` (atomically); returns its path."""
        path = os.path.join(os.fspath(run_dir), workdir.INFERENCE)
        _write_json(path, self.to_json())
        return path


def data_for(spec: InferenceSpec, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data`` (the datalists to read) with the run's preprocessing, classes and codes: what
    ``mode=eval`` prepares its volumes with. A setting that differed is logged by name."""
    modalities = datalist.check_modalities(data.modalities)
    if modalities != spec.modalities:
        raise RunSpecError(
            f"config.data.modalities={modalities} but the run was trained with {spec.modalities}: "
            "use the run's modality names and ids."
        )
    out = data.to_dict()
    run_values = {
        "spacing": tuple(spec.spacing),
        "roi": tuple(spec.roi),
        "num_classes": spec.num_classes,
        "class_names": tuple(spec.class_names),
        "union_name": spec.union_name,
    }
    changed: list[str] = []
    for key, value in run_values.items():
        current = tuple(out[key]) if isinstance(value, tuple) else out[key]
        if current != value:
            changed.append(f"{key}: {current!r} -> {value!r}")
        out[key] = value
    if datalist.label_code_map(data.label_codes, spec.num_classes) != spec.label_codes:
        changed.append("label_codes")
    out["label_codes"] = {str(k): v for k, v in spec.label_codes.items()}
    if any(intensity_settings(data, m) != spec.intensity[m] for m in spec.modalities):
        changed.append("intensity")
    out["intensity_by_modality"] = spec.intensity
    out = ml_collections.ConfigDict(out)
    if changed:
        log.warning("Using the run's preprocessing, not the config's: %s.", "; ".join(changed))
    return out


def _write_json(path: str, doc: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def write_postprocessing(run_dir: str | os.PathLike[str], decision: Mapping[str, Any]) -> str:
    """Write the post-processing decision (``postprocessing.json``) of a run; returns its path."""
    path = os.path.join(os.fspath(run_dir), workdir.POSTPROCESSING)
    _write_json(path, dict(decision))
    return path


def run_root(path: str | os.PathLike[str]) -> str:
    """The run directory that holds ``path``: itself, or the run above a checkpoint manager or step
    directory (``RUN/checkpoints/best/120``)."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    for _ in range(4):
        if any(os.path.isfile(os.path.join(probe, f)) for f in (workdir.INFERENCE, workdir.CONFIG)):
            return probe
        probe = os.path.dirname(probe)
    return path


def read(path: str | os.PathLike[str]) -> InferenceSpec:
    """The spec of the run that holds ``path`` (a run directory, a checkpoint inside one, or a convert
    directory), with its post-processing decision.

    Runs written before ``inference.json`` existed are read from their ``config.json``.
    """
    root = run_root(path)
    spec_path = os.path.join(root, workdir.INFERENCE)
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            spec = InferenceSpec.from_json(json.load(f), spec_path)
    else:
        config_path = os.path.join(root, workdir.CONFIG)
        if not os.path.isfile(config_path):
            raise RunSpecError(
                f"{os.fspath(path)!r} is not a run directory: no {workdir.INFERENCE} or {workdir.CONFIG} "
                "(expected a training workdir or a `python -m cinjax.convert` output)."
            )
        with open(config_path) as f:
            doc = json.load(f)
        if "data" not in doc or "model" not in doc:
            raise RunSpecError(
                f"{config_path} holds only a model config (a convert directory from an older cinjax): "
                "convert the weights again to record their preprocessing."
            )
        log.info("%s has no %s; reading its config.json.", root, workdir.INFERENCE)
        spec = InferenceSpec.from_config(ml_collections.ConfigDict(doc))
    pp_path = os.path.join(root, workdir.POSTPROCESSING)
    if os.path.isfile(pp_path):
        with open(pp_path) as f:
            spec = spec.with_postprocessing(json.load(f).get("largest_component", {}))
    return spec
