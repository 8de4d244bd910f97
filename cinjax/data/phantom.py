"""Embedded synthetic whole-heart dataset in the MM-WHS layout (CT, MR and optionally a third, black-blood
MR contrast; non-registered).

Each case is a random subject: a thorax (body with a fat layer, lungs, spine, ribs) around a heart made
of the seven MM-WHS substructures (LV/RV/LA/RA blood pools, LV myocardium, ascending aorta, pulmonary
artery). The heart is randomly posed (rotation, translation, scale), every substructure is jittered and
the whole heart is smoothly deformed by a random displacement field. The tubes carry some anatomy that
tells them apart (aortic arch, left pulmonary artery, pulmonary-vein stubs on the left atrium, inferior
vena cava on the right atrium, all labelled with their chamber / vessel); neighbouring blood pools are
separated by thin unlabelled walls and the heart is wrapped in pericardium and pericardial fat, so the
structures can be told apart by intensity, shape and position.

CT cases are rendered on an RAS grid of (1.6, 1.6, 2.0) mm with HU-like intensities (CTA timing: the
right heart less opacified than the left), partial-volume blur and Gaussian noise; MR cases come from
*different* subjects, on a (1.2, 1.2, 2.0) mm grid with a non-RAS (PLS) orientation, MR-like contrast
(bright blood and fat, dark myocardium and lungs), a smooth multiplicative bias field and Rician noise.
``num_mr2 > 0`` adds a third modality, ``MR2`` (id 2): a black-blood MR contrast with the blood/myocardium
contrast of MR inverted (dark blood pools, bright myocardium), on the MR grid with MR's bias field and
noise; it is the "new modality" of the add-a-modality experiment and makes M = 3 runs possible.
Files are written like MM-WHS::

    root/ct_train/ct_train_10NN_image.nii.gz   int16 HU
    root/ct_train/ct_train_10NN_label.nii.gz   int16 MM-WHS codes (0, 205, 420, 500, 550, 600, 820, 850)
    root/mr_train/mr_train_10NN_image.nii.gz   float32
    root/mr_train/mr_train_10NN_label.nii.gz
    root/mr2_train/...                         (num_mr2 > 0) the black-blood MR cases
    root/CT.json, root/MR.json                 MI-Seg datalists (modality 0 / 1; training/validation/test)
    root/MR2.json                              (num_mr2 > 0) modality 2
    root/phantom_manifest.json                 generation parameters (written last)

``generate`` is idempotent: it returns at once when the manifest says the same parameters were already
written. Everything is deterministic given ``seed``. Command line::

    python -m cinjax.data.phantom --root /tmp/phantom [--seed 0] [--num_ct 10] [--num_mr 10] [--num_mr2 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cinjax.data import mmwhs

VERSION = 2  # bump whenever the rendered data change for the same parameters
MANIFEST = "phantom_manifest.json"
CT, MR = mmwhs.MODALITIES["CT"], mmwhs.MODALITIES["MR"]
MR2 = 2
MODALITY_NAMES = {CT: "CT", MR: "MR", MR2: "MR2"}  # id -> name (the datalist's name and file prefix)
MODALITIES = {name: m for m, name in MODALITY_NAMES.items()}

# Tissue classes used for rendering intensities.
AIR, LUNG, FAT, SOFT, BONE, MYO, BLOOD_L, BLOOD_R = range(8)

# Compartments of the heart; the LV epicardium holds LV cavity + myocardium.
_EPI, _RV, _LA, _RA, _AO, _PA = range(6)
_COMPARTMENT_CODE = {_RV: 600, _LA: 420, _RA: 550, _AO: 820, _PA: 850}
_COMPARTMENT_TISSUE = {_RV: BLOOD_R, _LA: BLOOD_L, _RA: BLOOD_R, _AO: BLOOD_L, _PA: BLOOD_R}

_AXIS_DIRECTIONS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Generation parameters (all of them go into the manifest)."""

    seed: int = 0
    num_ct: int = 10
    num_mr: int = 10
    num_mr2: int = 0
    num_val: int = 2
    num_test: int = 2
    ct_shape: tuple[int, int, int] = (80, 80, 64)
    ct_spacing: tuple[float, float, float] = (1.6, 1.6, 2.0)
    ct_axcodes: str = "RAS"
    mr_shape: tuple[int, int, int] = (96, 96, 56)
    mr_spacing: tuple[float, float, float] = (1.2, 1.2, 2.0)
    mr_axcodes: str = "PLS"
    mr2_shape: tuple[int, int, int] = (96, 96, 56)
    mr2_spacing: tuple[float, float, float] = (1.2, 1.2, 2.0)
    mr2_axcodes: str = "PLS"
    wall_mm: float = 3.0

    def __post_init__(self):
        for name in ("ct_axcodes", "mr_axcodes", "mr2_axcodes"):
            codes = getattr(self, name)
            axes = sorted(_AXIS_DIRECTIONS[c][0] for c in codes if c in _AXIS_DIRECTIONS)
            if len(codes) != 3 or axes != [0, 1, 2]:
                raise ValueError(
                    f"{name}={codes!r}: need one of R/L, A/P, S/I per axis, e.g. 'RAS' or 'PLS'."
                )
        if not 0.0 <= self.wall_mm <= 6.0:
            raise ValueError(f"wall_mm={self.wall_mm}: walls between blood pools must be 0-6 mm thick.")
        for modality, n in (("CT", self.num_ct), ("MR", self.num_mr), ("MR2", self.num_mr2)):
            if modality == "MR2" and n == 0:
                continue
            if n < self.num_val + self.num_test + 1:
                raise ValueError(
                    f"num_{modality.lower()}={n} leaves no training case with num_val={self.num_val} and "
                    f"num_test={self.num_test}; raise num_{modality.lower()} or lower the splits."
                )

    def counts(self) -> dict[int, int]:
        """Number of cases per modality id (MR2 only when asked for)."""
        out = {CT: self.num_ct, MR: self.num_mr, MR2: self.num_mr2}
        return {m: n for m, n in out.items() if n}

    def grid(self, modality: int) -> tuple[tuple[int, ...], tuple[float, ...], str]:
        """``(shape, spacing, axcodes)`` of a modality's volumes."""
        prefix = MODALITY_NAMES[modality].lower()
        return tuple(getattr(self, f"{prefix}_{k}") for k in ("shape", "spacing", "axcodes"))


def axcodes_affine(
    shape: Sequence[int], spacing: Sequence[float], axcodes: str, center_mm: Sequence[float]
) -> np.ndarray:
    """Axis-aligned voxel→world (RAS mm) affine with the given orientation, centred on ``center_mm``."""
    affine = np.eye(4)
    for i, code in enumerate(axcodes):
        world_axis, sign = _AXIS_DIRECTIONS[code]
        affine[:3, i] = 0.0
        affine[world_axis, i] = sign * spacing[i]
    half = (np.asarray(shape, np.float64) - 1) / 2
    affine[:3, 3] = np.asarray(center_mm, np.float64) - affine[:3, :3] @ half
    return affine


# ---------------------------------------------------------------------------------------------------
# Random subject.


def _frame(direction: Sequence[float]) -> np.ndarray:
    """Orthonormal frame (columns) whose third axis is ``direction``."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(helper, d)
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(d, e1), d], axis=1)


def _warp_component(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """One smooth displacement term ``amp * sin(freq . q + phase)`` (wavelength 40-80 mm, 1-2.5 mm)."""
    amp = rng.uniform(1.0, 2.5, 3) * rng.choice([-1.0, 1.0], 3)
    direction = rng.normal(size=3)
    freq = direction / np.linalg.norm(direction) * 2 * np.pi / rng.uniform(40, 80)
    return amp, freq, float(rng.uniform(0, 2 * np.pi))


def _polyline(rng: np.random.Generator, points, radius_range) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Capsule segments through jittered ``points`` (heart-local mm), one random radius, tapering 10 %
    per segment."""
    pts = [np.asarray(p, np.float64) + rng.uniform(-2.5, 2.5, 3) for p in points]
    r = float(rng.uniform(*radius_range))
    return [(a, b, r * 0.9**i) for i, (a, b) in enumerate(zip(pts[:-1], pts[1:]))]


def sample_subject(rng: np.random.Generator, black_blood: bool = False) -> dict[str, Any]:
    """Draw one random subject: thorax geometry, heart pose, substructures, deformation, contrasts.

    ``black_blood`` also draws the MR2 contrast (after everything else, so the CT and MR draws of a
    stream are the same with or without it).
    """

    def jitter(v, mm=2.0):
        return np.asarray(v, np.float64) + rng.uniform(-mm, mm, 3)

    def axes(v, rel=0.12):
        return np.asarray(v, np.float64) * rng.uniform(1 - rel, 1 + rel, 3)

    def tilt(direction, deg=10.0):
        rot = Rotation.from_euler("xyz", rng.uniform(-deg, deg, 3), degrees=True).as_matrix()
        return rot @ _frame(direction)

    heart = {
        "center": np.array([-8.0, 6.0, 0.0]) + rng.uniform([-5, -4, -5], [5, 4, 5]),
        "rotation": Rotation.from_euler(
            "xyz", rng.uniform([-15, -15, -20], [15, 15, 20]), degrees=True
        ).as_matrix(),
        "scale": float(rng.uniform(1.2, 1.45)),
        "myo_mm": float(rng.uniform(4.5, 6.0)),
        # Heart-local (RAS) layout; ellipsoid frames have the long axis last.
        "lv": (jitter([-10, 2, -10]), axes([12, 12, 22]), tilt([-0.45, 0.35, -0.8])),
        "rv": (jitter([9, 14, -12]), axes([14, 8, 21]), tilt([-0.4, 0.3, -0.85])),
        "la": (jitter([-6, -21, 14]), axes([9, 10, 14]), tilt([1, 0, 0])),
        "ra": (jitter([19, -8, 8]), axes([10, 10, 13]), tilt([0, 0.2, 1])),
        # Tubes as polylines of (start, end, radius) segments: the ascending aorta with the start of the
        # arch (hooking posteriorly), the pulmonary trunk with its left branch, four pulmonary-vein stubs
        # on the left atrium and the inferior vena cava below the right atrium.
        "ao": _polyline(rng, [[-1, -3, 4], [3, -6, 30], [-2, -16, 42], [-12, -26, 40]], (6.0, 7.5)),
        "pa": _polyline(rng, [[-3, 18, 4], [-10, 8, 28], [-28, -4, 30]], (6.0, 7.5)),
        "la_veins": [
            seg
            for a, b in (
                ([-14, -24, 18], [-30, -28, 22]),
                ([-14, -24, 10], [-30, -28, 6]),
                ([2, -24, 18], [16, -28, 22]),
                ([2, -24, 10], [16, -28, 6]),
            )
            for seg in _polyline(rng, [a, b], (3.5, 4.5))
        ],
        "ivc": _polyline(rng, [[18, -6, -2], [14, -4, -40]], (5.0, 6.5)),
        "warp": [_warp_component(rng) for _ in range(4)],
    }
    thorax = {
        "body": (float(rng.uniform(66, 74)), float(rng.uniform(50, 56))),
        "body_center": (float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3))),
        "fat_mm": float(rng.uniform(4, 7)),
        "lung_dx": float(rng.uniform(0.48, 0.55)),
        "spine_radius": float(rng.uniform(8, 10)),
        "rib_period": float(rng.uniform(16, 20)),
        "rib_phase": float(rng.uniform(0, 2 * np.pi)),
    }
    blood_l = rng.uniform(380, 480)
    ct = {  # contrast timing of a coronary CTA: the right heart is less opacified than the left
        LUNG: rng.uniform(-850, -780),
        FAT: rng.uniform(-110, -80),
        SOFT: rng.uniform(30, 55),
        BONE: rng.uniform(450, 650),
        MYO: rng.uniform(125, 165),
        BLOOD_L: blood_l,
        BLOOD_R: blood_l - rng.uniform(80, 140),
        AIR: -1000.0,
        "noise": rng.uniform(12, 25),
        "blur_mm": rng.uniform(0.8, 1.2),
    }
    mr = {
        LUNG: rng.uniform(20, 60),
        FAT: rng.uniform(550, 700),
        SOFT: rng.uniform(200, 260),
        BONE: rng.uniform(300, 420),
        MYO: rng.uniform(130, 180),
        BLOOD_L: rng.uniform(700, 850),
        BLOOD_R: rng.uniform(680, 850),
        AIR: 0.0,
        "noise": rng.uniform(12, 25),
        "blur_mm": rng.uniform(1.0, 1.5),
        "gain": rng.uniform(0.8, 1.2),
        "bias": rng.uniform(-0.25, 0.25, 9),
    }
    subject = {"heart": heart, "thorax": thorax, "ct": ct, "mr": mr, "fov_jitter": rng.uniform(-4, 4, 3)}
    if black_blood:
        # Black-blood MR: flowing blood is nulled (dark), the myocardium is bright; the other tissues keep
        # MR-like values, so the new modality differs from MR mainly inside the heart.
        subject["mr2"] = {
            **mr,
            MYO: rng.uniform(520, 640),
            BLOOD_L: rng.uniform(40, 90),
            BLOOD_R: rng.uniform(40, 90),
            FAT: rng.uniform(380, 460),
            "gain": rng.uniform(0.8, 1.2),
            "bias": rng.uniform(-0.25, 0.25, 9),
        }
    return subject


# ---------------------------------------------------------------------------------------------------
# Rendering.


_NEAR_MM = 8.0  # heart-local band in which shapes need accurate distances (> walls and envelope / scale)


def _norm3(v: np.ndarray) -> np.ndarray:
    return np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _ellipsoid_sdf(q: np.ndarray, center, semi_axes, frame) -> np.ndarray:
    """Approximate signed distance (mm) from points ``q`` (3, N) to an ellipsoid.

    Near the surface: Quilez's first-order estimate; farther than ``_NEAR_MM`` outside the bounding
    sphere only the cheap lower bound ``|q - c| - max(semi_axes)`` (all callers threshold well below it).
    """
    d = q - np.asarray(center, np.float32)[:, None]
    r = _norm3(d)
    out = r - np.float32(max(semi_axes))
    near = np.flatnonzero(out < _NEAR_MM)
    u = np.asarray(frame, np.float32).T @ d[:, near]
    a = np.asarray(semi_axes, np.float32)[:, None]
    k0 = _norm3(u / a)
    k1 = _norm3(u / (a * a))
    out[near] = k0 * (k0 - 1) / np.maximum(k1, 1e-6)
    return out


def _capsule_sdf(q: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Signed distance (mm) from points ``q`` (3, N) to the tube of ``radius`` around segment ab."""
    a = np.asarray(a, np.float32)[:, None]
    ab = np.asarray(b, np.float32)[:, None] - a
    d = q - a
    h = np.clip((ab * d).sum(0) / float((ab * ab).sum()), 0.0, 1.0)
    return _norm3(d - h * ab) - np.float32(radius)


def _union(sdf: np.ndarray | None, q: np.ndarray, segments) -> np.ndarray:
    """``sdf`` (or nothing) united with capsules ``[(a, b, radius), ...]``."""
    for seg in segments:
        d = _capsule_sdf(q, *seg)
        sdf = d if sdf is None else np.minimum(sdf, d)
    return sdf


def _heart(p: np.ndarray, heart: dict[str, Any], wall_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label codes, tissue classes and signed distance to the heart at world points ``p`` (3, N)."""
    s = heart["scale"]
    q = heart["rotation"].T.astype(np.float32) @ (p - heart["center"].astype(np.float32)[:, None])
    q /= np.float32(s)
    for amp, freq, phase in heart["warp"]:
        q += np.sin(freq.astype(np.float32) @ q + np.float32(phase)) * amp.astype(np.float32)[:, None]
    lv_c, lv_a, lv_f = heart["lv"]
    lv = _ellipsoid_sdf(q, lv_c, lv_a, lv_f)
    epi = _ellipsoid_sdf(q, lv_c, lv_a + heart["myo_mm"], lv_f)
    rv = np.maximum(_ellipsoid_sdf(q, *heart["rv"]), -epi)  # the RV wraps around the septum
    sdf = np.stack(
        [
            epi,
            rv,
            _union(_ellipsoid_sdf(q, *heart["la"]), q, heart["la_veins"]),
            _union(_ellipsoid_sdf(q, *heart["ra"]), q, heart["ivc"]),
            _union(None, q, heart["ao"]),
            _union(None, q, heart["pa"]),
        ]
    )
    sdf *= np.float32(s)
    owner = np.argmin(sdf, axis=0)
    n = np.arange(sdf.shape[1])
    own = sdf[owner, n]
    sdf[owner, n] = np.inf  # now: distances to the other compartments
    sdf[_EPI, owner == _RV] = np.inf  # no extra wall between the RV and the septum (it is myocardium)
    wall = (owner != _EPI) & (sdf.min(axis=0) - own < wall_mm)
    inside = (own < 0) & ~wall

    code = np.zeros(len(own), np.int16)
    tissue = np.full(len(own), SOFT, np.uint8)
    for comp, value in _COMPARTMENT_CODE.items():
        sel = inside & (owner == comp)
        code[sel] = value
        tissue[sel] = _COMPARTMENT_TISSUE[comp]
    in_epi = inside & (owner == _EPI)
    cavity = in_epi & (lv < 0)
    code[in_epi] = 205
    tissue[in_epi] = MYO
    code[cavity] = 500
    tissue[cavity] = BLOOD_L
    return code, tissue, own


def _thorax(p: np.ndarray, thorax: dict[str, Any]) -> np.ndarray:
    """Tissue classes of the thorax (without the heart) at world points ``p`` (3, N)."""
    bx, by = thorax["body"]
    cx, cy = thorax["body_center"]
    x, y, z = p[0] - cx, p[1] - cy, p[2]
    r_body = np.sqrt((x / bx) ** 2 + (y / by) ** 2)
    fat = thorax["fat_mm"]
    r_inner = np.sqrt((x / (bx - fat)) ** 2 + (y / (by - fat)) ** 2)
    tissue = np.full(p.shape[1], AIR, np.uint8)
    tissue[r_body < 1] = FAT
    tissue[r_inner < 1] = SOFT
    lung_x = thorax["lung_dx"] * bx
    for side in (-1, 1):
        r_lung = np.sqrt(
            ((x - side * lung_x) / (0.4 * bx)) ** 2 + ((y + 4) / (0.72 * by)) ** 2 + (z / 90.0) ** 2
        )
        tissue[(r_lung < 1) & (r_inner < 0.93)] = LUNG
    spine = np.hypot(x, y + by - 20) < thorax["spine_radius"]
    ribs = (np.abs(r_inner - 0.9) < 3.0 / bx) & (
        np.cos(2 * np.pi * z / thorax["rib_period"] + thorax["rib_phase"]) > 0.55
    )
    tissue[spine | ribs] = BONE
    return tissue


def _smooth_bias(coords: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """exp of a random quadratic polynomial in normalised coordinates (a smooth multiplicative field)."""
    u = coords / np.abs(coords).max(axis=1, keepdims=True).clip(1e-6)
    x, y, z = u
    terms = np.stack([x, y, z, x * y, y * z, x * z, x * x - 0.5, y * y - 0.5, z * z - 0.5])
    return np.exp(coeffs.astype(np.float32) @ terms)


def render(
    subject: dict[str, Any],
    modality: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    axcodes: str,
    rng: np.random.Generator,
    wall_mm: float = PhantomConfig.wall_mm,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject as CT (``modality`` 0), MR (1) or black-blood MR (2, needs a subject drawn with
    ``black_blood=True``): (image, label codes int16, affine)."""
    heart = subject["heart"]
    center = heart["center"] + np.array([4.0, -4.0, 8.0]) + subject["fov_jitter"]
    affine = axcodes_affine(shape, spacing, axcodes, center)
    axes = [
        np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
        for k, n in enumerate(shape)
    ]
    p = np.stack(
        [
            sum(np.float32(affine[j, k]) * axes[k] for k in range(3)) + np.float32(affine[j, 3])
            for j in range(3)
        ]
    ).reshape(3, -1)  # world mm of every voxel centre, (3, N)

    tissue = _thorax(p, subject["thorax"])
    code, heart_tissue, envelope = _heart(p, heart, wall_mm)
    # Around the heart: a thin pericardium, then a layer of pericardial fat that pushes the lungs away.
    tissue[(envelope > 1.5) & (envelope < 5.0)] = FAT
    near_heart = envelope <= 1.5
    tissue[near_heart] = heart_tissue[near_heart]

    contrast = subject[MODALITY_NAMES[modality].lower()]
    lut = np.array([contrast[t] for t in range(8)], np.float32)
    image = lut[tissue]
    if modality != CT:
        image = image * contrast["gain"] * _smooth_bias(p - p.mean(1, keepdims=True), contrast["bias"])
    image = image.reshape(shape)
    label = code.reshape(shape)
    sigma = [contrast["blur_mm"] / s for s in spacing]
    image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    noise = contrast["noise"]
    if modality == CT:
        image = image + rng.normal(0, noise, image.shape).astype(np.float32)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        noise = noise * contrast["gain"]
        n1 = rng.normal(0, noise, image.shape).astype(np.float32)
        n2 = rng.normal(0, noise, image.shape).astype(np.float32)
        image = np.sqrt((image + n1) ** 2 + n2**2).astype(np.float32)  # Rician magnitude
    return image, label, affine


# ---------------------------------------------------------------------------------------------------
# Dataset on disk.


def case_rng(seed: int, modality: int, case_id: int) -> np.random.Generator:
    """Independent stream per (seed, modality, case): CT and MR cases are different subjects."""
    return np.random.default_rng(np.random.SeedSequence([seed, modality, case_id]))


def _case_paths(modality: int, case_id: int) -> tuple[str, str]:
    prefix = MODALITY_NAMES[modality].lower() + "_train"
    stem = f"{prefix}/{prefix}_{case_id}"
    return f"{stem}_image.nii.gz", f"{stem}_label.nii.gz"


def _datalist(cfg: PhantomConfig, modality: int, ids: list[int]) -> dict[str, Any]:
    entries = [dict(zip(("image", "label"), _case_paths(modality, i))) for i in ids]
    n_train = len(ids) - cfg.num_val - cfg.num_test
    name = MODALITY_NAMES[modality]
    return {
        "name": "MM-WHS phantom",
        "description": f"cinjax synthetic whole-heart {name} phantom (seed {cfg.seed}); label values are "
        "MM-WHS codes; test is held out from training and validation.",
        "labels": {"0": "background", **{str(k): v for k, v in mmwhs.CODE_NAMES.items()}},
        "licence": "Apache-2.0 (synthetic data)",
        "reference": "cinjax.data.phantom",
        "release": f"phantom v{VERSION}",
        "tensorImageSize": "3D",
        "modality": modality,
        "numTraining": n_train,
        "numValidation": cfg.num_val,
        "numTest": cfg.num_test,
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + cfg.num_val],
        "test": entries[n_train + cfg.num_val :],
    }


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _manifest_params(cfg: PhantomConfig) -> dict[str, Any]:
    params = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples → lists, as stored
    if not cfg.num_mr2:  # a CT + MR phantom keeps the manifest it had before MR2 existed
        params = {k: v for k, v in params.items() if not k.startswith(("num_mr2", "mr2_"))}
    return params


def generate(
    root: str,
    *,
    seed: int = 0,
    num_ct: int = PhantomConfig.num_ct,
    num_mr: int = PhantomConfig.num_mr,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Write the phantom dataset under ``root`` (skipped if already there with the same parameters).

    ``overrides`` are further :class:`PhantomConfig` fields (``num_mr2``, ``num_val``, ``num_test``,
    ``ct_shape``, ``ct_spacing``, ``mr_shape``, ``mr_spacing``, ``ct_axcodes``, ``mr_axcodes``, the
    ``mr2_*`` grid, ``wall_mm``).
    Returns ``{"root", "datalists": {"CT": path, "MR": path[, "MR2": path]}, "data_dirs", "json_lists",
    "cases", "generated" (False when skipped), "seconds"}``; ``data_dirs``/``json_lists`` are MI-Seg's
    CLI pair.
    """
    start = time.perf_counter()
    cfg = PhantomConfig(seed=seed, num_ct=num_ct, num_mr=num_mr, **overrides)
    root = os.path.abspath(root)
    params = _manifest_params(cfg)
    manifest_path = os.path.join(root, MANIFEST)
    counts = cfg.counts()
    names = [MODALITY_NAMES[m] for m in counts]
    cases = [(m, 1001 + i) for m, n in counts.items() for i in range(n)]
    files = [f for m, i in cases for f in _case_paths(m, i)] + [f"{name}.json" for name in names]
    result = {
        "root": root,
        "datalists": {name: os.path.join(root, f"{name}.json") for name in names},
        "data_dirs": [root] * len(names),
        "json_lists": [f"{name}.json" for name in names],
        "cases": [
            {
                "modality": m,
                "id": i,
                "image": os.path.join(root, _case_paths(m, i)[0]),
                "label": os.path.join(root, _case_paths(m, i)[1]),
            }
            for m, i in cases
        ],
    }
    old = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if (
            not force
            and old.get("version") == VERSION
            and old.get("params") == params
            and all(os.path.exists(os.path.join(root, f)) for f in files)
        ):
            return dict(result, generated=False, seconds=time.perf_counter() - start)
        os.remove(manifest_path)  # the files below are about to change

    for name in names:
        os.makedirs(os.path.join(root, f"{name.lower()}_train"), exist_ok=True)
    for modality, case_id in cases:
        rng = case_rng(cfg.seed, modality, case_id)
        subject = sample_subject(rng, black_blood=modality == MR2)
        shape, spacing, axcodes = cfg.grid(modality)
        image, label, affine = render(subject, modality, shape, spacing, axcodes, rng, cfg.wall_mm)
        image_rel, label_rel = _case_paths(modality, case_id)
        for rel, array in ((image_rel, image), (label_rel, label)):
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, os.path.join(root, rel))
    for modality in counts:
        ids = [i for m, i in cases if m == modality]
        _write_json(result["datalists"][MODALITY_NAMES[modality]], _datalist(cfg, modality, ids))
    if old is not None:
        for rel in set(old.get("files", [])) - set(files):
            path = os.path.join(root, rel)
            if os.path.exists(path):
                os.remove(path)
    _write_json(manifest_path, {"version": VERSION, "params": params, "files": files})
    return dict(result, generated=True, seconds=time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output directory (MM-WHS layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_ct", type=int, default=PhantomConfig.num_ct)
    parser.add_argument("--num_mr", type=int, default=PhantomConfig.num_mr)
    parser.add_argument("--num_mr2", type=int, default=PhantomConfig.num_mr2, help="black-blood MR cases")
    parser.add_argument("--num_val", type=int, default=PhantomConfig.num_val)
    parser.add_argument("--num_test", type=int, default=PhantomConfig.num_test)
    parser.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")
    args = parser.parse_args(argv)
    out = generate(
        args.root,
        seed=args.seed,
        num_ct=args.num_ct,
        num_mr=args.num_mr,
        num_mr2=args.num_mr2,
        num_val=args.num_val,
        num_test=args.num_test,
        force=args.force,
    )
    state = "generated" if out["generated"] else "up to date"
    print(
        f"{out['root']}: {len(out['cases'])} cases {state} in {out['seconds']:.1f} s; "
        f"datalists {', '.join(out['datalists'].values())}"
    )


if __name__ == "__main__":
    main()


def generate_from_config(data: Any) -> dict[str, Any] | None:
    """Write the phantom a data config describes (``data.phantom.generate``) under ``data.root``.

    Returns :func:`generate`'s result, or None when the config asks for no phantom. Idempotent.
    """
    spec = data.get("phantom")
    if not spec or not spec.get("generate", False):
        return None
    kwargs = {k: v for k, v in dict(spec).items() if k != "generate"}
    return generate(data.root, **kwargs)
