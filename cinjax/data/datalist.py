"""Datalists: which volumes belong to which split and modality, and how label codes map to classes.

Two sources, chosen by ``data.layout``:

* ``"json"`` — MI-Seg / Medical-Decathlon datalist files, read unchanged. A file has lists
  ``training`` / ``validation`` / ``test`` (each optional, possibly empty) of
  ``{"image": rel_path, "label": rel_path}`` (test entries may omit the label, or be bare path strings
  as in the Decathlon). Paths are relative to the file's data directory. The modality comes from the
  top-level ``modality`` (MI-Seg: one integer per file; a name such as ``"MR"`` or a Decathlon
  one-channel dict ``{"0": "CT"}`` also work) and can be overridden per entry with ``"modality"``
  (an id or a name).
* ``"mmwhs"`` — the MM-WHS folder layout (:func:`cinjax.data.mmwhs.discover`); validation ids come
  from the config.

Modalities are named in the config (``data.modalities``, e.g. ``{"CT": 0, "MR": 1}``; ids 0..M-1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cinjax.data import mmwhs
from cinjax.data.io import DataError

SPLITS = ("training", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One volume of a datalist: absolute paths, modality id, split, and where it was listed."""

    image: str
    label: str | None
    modality: int
    split: str
    source: str

    @property
    def name(self) -> str:
        """File name without ``.nii`` / ``.nii.gz``."""
        base = os.path.basename(self.image)
        for ext in (".nii.gz", ".nii"):
            if base.endswith(ext):
                return base[: -len(ext)]
        return base


def check_modalities(modalities: Mapping[str, int]) -> dict[str, int]:
    """Validate a name -> id map: at least one modality, ids exactly 0..M-1."""
    mods = {str(k): int(v) for k, v in dict(modalities).items()}
    if not mods:
        raise DataError("data.modalities is empty; name at least one modality, e.g. {'CT': 0}.")
    if sorted(mods.values()) != list(range(len(mods))):
        raise DataError(f"data.modalities ids must be 0..{len(mods) - 1} (each once), got {mods}.")
    return mods


def modality_names(modalities: Mapping[str, int]) -> dict[int, str]:
    """id -> name."""
    return {int(v): str(k) for k, v in modalities.items()}


def resolve_modality(value: Any, modalities: Mapping[str, int], where: str) -> int:
    """A modality given as an id or a name (case-insensitive) -> its id; unknown -> error listing known."""
    known = ", ".join(f"{k}={v}" for k, v in modalities.items())
    if isinstance(value, Mapping):  # Medical-Decathlon style channel dict {"0": "CT"}
        if len(value) != 1:
            raise DataError(
                f"{where}: modality {dict(value)} has {len(value)} channels; cinjax takes "
                "one-channel volumes with one modality each."
            )
        value = next(iter(value.values()))
    if isinstance(value, bool):
        raise DataError(f"{where}: modality {value!r} is not an id or a name (known: {known}).")
    if isinstance(value, (int,)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        mid = int(value)
        if mid not in modalities.values():
            raise DataError(
                f"{where}: modality id {mid} is not configured (known: {known}); add it to data.modalities."
            )
        return mid
    if isinstance(value, str):
        for name, mid in modalities.items():
            if name.lower() == value.strip().lower():
                return int(mid)
        raise DataError(f"{where}: unknown modality {value!r} (known: {known}); add it to data.modalities.")
    raise DataError(f"{where}: modality {value!r} is not an id or a name (known: {known}).")


def label_code_map(spec: Any, num_classes: int) -> dict[int, int]:
    """Label code map from ``data.label_codes``: ``"identity"``, ``"mmwhs"`` or ``{code: class}``.

    Code 0 always means background. Classes must lie in 1..num_classes-1 (0 allowed).
    """
    if isinstance(spec, str):
        if spec == "identity":
            return {c: c for c in range(num_classes)}
        if spec == "mmwhs":
            codes = dict(mmwhs.CODES)
        else:
            raise DataError(
                f"data.label_codes={spec!r}: expected 'identity', 'mmwhs' or a {{code: class}} map."
            )
    else:
        codes = {int(k): int(v) for k, v in dict(spec).items()}
    codes = {0: 0, **codes}
    bad = {k: v for k, v in codes.items() if not 0 <= v < num_classes}
    if bad:
        raise DataError(
            f"data.label_codes maps {bad} outside classes 0..{num_classes - 1} "
            f"(data.num_classes={num_classes})."
        )
    return codes


def _entry(
    raw: Any,
    split: str,
    base: str,
    file_modality: Any,
    modalities: Mapping[str, int],
    source: str,
    index: int,
) -> Entry:
    where = f"{source} [{split}][{index}]"
    if isinstance(raw, str):
        raw = {"image": raw}
    if not isinstance(raw, Mapping) or "image" not in raw:
        raise DataError(f"{where}: entry {raw!r} has no 'image' path.")
    modality = raw.get("modality", file_modality)
    if modality is None:
        raise DataError(f"{where}: no modality: give a top-level 'modality' in the file or one per entry.")
    mid = resolve_modality(modality, modalities, where)
    label = raw.get("label")
    if label is None and split != "test":
        raise DataError(f"{where}: {split} entry {raw['image']!r} has no 'label'.")
    return Entry(
        image=os.path.normpath(os.path.join(base, raw["image"])),
        label=None if label is None else os.path.normpath(os.path.join(base, label)),
        modality=mid,
        split=split,
        source=source,
    )


def read_datalist(
    json_path: str, data_dir: str | None, modalities: Mapping[str, int], problems: list[str] | None = None
) -> dict[str, list[Entry]]:
    """Read one MI-Seg / Decathlon datalist JSON -> entries per split (missing splits are empty).

    Paths are relative to ``data_dir`` (default: the JSON's directory). Bad entries raise
    :class:`DataError`, or are appended to ``problems`` (and skipped) when a list is given.
    """
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}

    def fail(msg: str) -> None:
        if problems is None:
            raise DataError(msg)
        problems.append(msg)

    if not os.path.exists(json_path):
        fail(f"{json_path}: datalist file does not exist.")
        return out
    try:
        with open(json_path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{json_path}: cannot parse the datalist as JSON ({e}).")
        return out
    if not isinstance(doc, Mapping):
        fail(f"{json_path}: a datalist must be a JSON object with 'training' / 'validation' / 'test' lists.")
        return out
    if not any(s in doc for s in SPLITS):
        fail(f"{json_path}: no 'training', 'validation' or 'test' list found.")
        return out
    base = os.path.abspath(data_dir if data_dir is not None else os.path.dirname(os.path.abspath(json_path)))
    for split in SPLITS:
        items = doc.get(split) or []
        if not isinstance(items, Sequence) or isinstance(items, str):
            fail(f"{json_path}: '{split}' must be a list, got {type(items).__name__}.")
            continue
        for i, raw in enumerate(items):
            try:
                out[split].append(_entry(raw, split, base, doc.get("modality"), modalities, json_path, i))
            except DataError as e:
                fail(str(e))
    return out


def _mmwhs_entries(
    root: str, modalities: Mapping[str, int], mm: Any, problems: list[str] | None
) -> dict[str, list[Entry]]:
    """Entries of the MM-WHS folder layout (``data.mmwhs`` settings); see :func:`mmwhs.discover`."""
    found, fails = mmwhs.discover(
        root, list(modalities), dict(mm.validation_ids), mm.image_suffix, mm.label_suffix
    )
    if fails and problems is None:
        raise DataError("\n".join(fails))
    if problems is not None:
        problems.extend(fails)
    return {
        split: [
            Entry(image, label, int(modalities[name]), split, folder) for image, label, name, folder in items
        ]
        for split, items in found.items()
    }


def collect_entries(data: Any, problems: list[str] | None = None) -> dict[str, list[Entry]]:
    """All entries of the configured datalists, per split (see cinjax.data.config for the keys)."""
    modalities = check_modalities(data.modalities)
    root = os.path.abspath(os.path.expanduser(data.root))
    if data.layout == "mmwhs":
        return _mmwhs_entries(root, modalities, data.mmwhs, problems)
    if data.layout != "json":
        raise DataError(f"data.layout={data.layout!r}: expected 'json' or 'mmwhs'.")
    json_lists = list(data.json_lists)
    if not json_lists:
        raise DataError("data.json_lists is empty; list at least one datalist JSON (e.g. 'CT_fold1.json').")
    data_dirs = list(data.data_dirs) or [""] * len(json_lists)
    if len(data_dirs) != len(json_lists):
        raise DataError(
            f"data.data_dirs has {len(data_dirs)} entries but data.json_lists has "
            f"{len(json_lists)}; give one data dir per datalist (or none)."
        )
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for json_name, sub in zip(json_lists, data_dirs):
        data_dir = os.path.join(root, sub)
        part = read_datalist(os.path.join(data_dir, json_name), data_dir, modalities, problems)
        for split in SPLITS:
            out[split].extend(part[split])
    return out


def load_entries(data: Any) -> dict[str, list[Entry]]:
    """Like :func:`collect_entries` but raises one :class:`DataError` listing every problem."""
    problems: list[str] = []
    out = collect_entries(data, problems)
    if problems:
        raise DataError(f"{len(problems)} datalist problem(s):\n" + "\n".join(problems))
    return out
