"""Sliding-window inference over whole volumes, with MONAI's window placement and blending.

Windows are placed exactly as MONAI's ``sliding_window_inference`` places them (MI-Seg's evaluation):
per axis the stride is ``int(roi * (1 - overlap))`` (at least 1; the whole ROI when the ROI equals the
size), starts run 0, stride, 2*stride, ... until a window reaches the end, and the last start is
clamped to ``size - roi``; windows are enumerated d-major. A volume smaller than the ROI is padded with
``pad_value`` (floor of the difference before, ceil after) and the result cropped back.

Unlike MI-Seg (which needs ``sw_batch_size=1`` with conditional norms), several windows go through
the model per call, each carrying the volume's modality id. ``windows_per_call`` is fixed, so the
model compiles once per window shape; the last call is filled up with dummy windows whose outputs
are dropped. Predictions are weighted (``"constant"``: 1, ``"gaussian"``: MONAI's importance map),
summed in fp32 and divided by the summed weights.

Memory: with ``stitch_on_host=True`` the volume and the output live in host memory and the device
only ever holds one batch of windows and their logits; otherwise the volume and an fp32 output
buffer of ``(D, H, W, K)`` live on the device and only window start indices cross the bus.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cinjax.shapes import Triple, padding_to, triple

Blend = Literal["constant", "gaussian"]
BLENDS = ("constant", "gaussian")
PredictFn = Callable[[jax.Array, jax.Array], jax.Array]


def _triple_overlap(overlap: float | Sequence[float]) -> tuple[float, float, float]:
    o = (float(overlap),) * 3 if isinstance(overlap, (int, float)) else tuple(float(i) for i in overlap)
    if len(o) != 3 or not all(0.0 <= i < 1.0 for i in o):
        raise ValueError(f"overlap must be in [0, 1) (one value or 3), got {overlap}.")
    return o  # type: ignore[return-value]


def dense_windows(
    shape: Sequence[int], roi: int | Sequence[int], overlap: float | Sequence[float] = 0.5
) -> list[Triple]:
    """Window start indices, d-major, as MONAI places them.

    ``shape`` is the spatial size of the volume; axes smaller than the ROI count as padded up to it
    (the starts are then indices into the padded volume, see :func:`cinjax.shapes.padding_to`).
    """
    roi = triple(roi, "roi")
    overlap = _triple_overlap(overlap)
    size = [max(int(s), r) for s, r in zip(triple(tuple(shape), "shape"), roi)]
    per_axis = []
    for n, r, o in zip(size, roi, overlap):
        stride = r if r == n else max(int(r * (1 - o)), 1)
        count = next(i for i in range(math.ceil(n / stride)) if i * stride + r >= n) + 1
        per_axis.append([min(i * stride, n - r) for i in range(count)])
    return [(d, h, w) for d in per_axis[0] for h in per_axis[1] for w in per_axis[2]]


def importance_map(
    roi: int | Sequence[int], blend: Blend = "constant", sigma_scale: float = 0.125
) -> np.ndarray:
    """Per-voxel weight of a window's prediction (fp32, shape ``roi``), as MONAI 1.6 computes it.

    ``"gaussian"``: the product over axes of ``exp(-x^2 / (2 sigma^2))`` with ``x`` measured from the
    window centre and ``sigma = sigma_scale * roi``, clamped below at ``max(min, 1e-3)`` so that
    the border voxels keep a non-negligible weight.
    """
    roi = triple(roi, "roi")
    if blend == "constant":
        return np.ones(roi, np.float32)
    if blend != "gaussian":
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
    weight = None
    for axis, r in enumerate(roi):
        x = np.arange(r, dtype=np.float32) - np.float32((r - 1) / 2)
        g = np.exp(x**2 / np.float32(-2 * (r * sigma_scale) ** 2)).astype(np.float32)
        weight = g if weight is None else weight[..., None] * g[(None,) * axis]
    return np.maximum(weight, max(float(weight.min()), 1e-3)).astype(np.float32)


@partial(jax.jit, static_argnums=2)
def _extract(image: jax.Array, starts: jax.Array, roi: Triple) -> jax.Array:
    """Cut ``len(starts)`` windows of size ``roi`` out of a (D, H, W, C) device volume."""
    size = (*roi, image.shape[-1])
    return jax.vmap(lambda s: lax.dynamic_slice(image, (s[0], s[1], s[2], 0), size))(starts)


@partial(jax.jit, donate_argnums=0)
def _accumulate(
    out: jax.Array, logits: jax.Array, starts: jax.Array, n_valid: jax.Array, weight: jax.Array
) -> jax.Array:
    """Add the first ``n_valid`` weighted window predictions into the fp32 output buffer, in order."""
    weighted = logits.astype(jnp.float32) * weight[None, ..., None]

    def add(i, out):
        idx = (starts[i, 0], starts[i, 1], starts[i, 2], 0)
        current = lax.dynamic_slice(out, idx, weighted.shape[1:])
        return lax.dynamic_update_slice(out, current + weighted[i], idx)

    return lax.fori_loop(0, n_valid, add, out)


@partial(jax.jit, static_argnums=(2, 3))
def _normalise(
    out: jax.Array, count: jax.Array, pads: tuple[tuple[int, int], ...], shape: Triple
) -> jax.Array:
    """Divide by the summed window weights and crop the padding away."""
    lo = tuple(p[0] for p in pads)
    hi = tuple(a + s for a, s in zip(lo, shape))
    return lax.slice(out / count[..., None], (*lo, 0), (*hi, out.shape[-1]))


def _check_mesh(mesh: Mesh, windows_per_call: int) -> None:
    if windows_per_call % mesh.size:
        raise ValueError(
            f"windows_per_call={windows_per_call} must be a multiple of the mesh's {mesh.size} devices "
            "to split each batch of windows evenly."
        )
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError(
            "Sliding-window inference runs one volume per process: pass a mesh over this process's "
            "devices (jax.local_devices()) and split the volumes across processes."
        )


def sliding_window_inference(
    predict_fn: PredictFn,
    image: np.ndarray | jax.Array,
    modality: int,
    roi: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.5,
    windows_per_call: int = 4,
    blend: Blend = "constant",
    sigma_scale: float = 0.125,
    pad_value: float = 0.0,
    stitch_on_host: bool = False,
    num_classes: int | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray | jax.Array:
    """Logits ``(D, H, W, K)`` (fp32) of a whole ``(D, H, W, C)`` volume from windows of size ``roi``.

    ``predict_fn(windows (N, *roi, C), modality (N,) int32) -> logits (N, *roi, K)`` is the caller's
    jitted model (e.g. ``jax.jit(partial(model.apply, variables))``); ``N = windows_per_call``
    always, so it compiles once. Every window carries ``modality``. With ``mesh`` (a ``("data",)``
    mesh over local devices) each batch of windows is split across the devices. Returns numpy with
    ``stitch_on_host=True``, else a device array. ``num_classes``, when given, is checked against
    the model's output.
    """
    roi = triple(roi, "roi")
    if image.ndim != 4:
        raise ValueError(f"image must be (D, H, W, C) channels-last, got shape {image.shape}.")
    if isinstance(modality, bool) or not isinstance(modality, (int, np.integer)) or modality < 0:
        raise ValueError(f"modality must be a non-negative int id, got {modality!r}.")
    if windows_per_call < 1:
        raise ValueError(f"windows_per_call must be >= 1, got {windows_per_call}.")
    if mesh is not None:
        _check_mesh(mesh, windows_per_call)
    shape = tuple(int(s) for s in image.shape[:3])
    pads = padding_to(shape, roi)
    starts = np.asarray(dense_windows(shape, roi, overlap), np.int32)
    weight = importance_map(roi, blend, sigma_scale)
    padded_shape = tuple(s + lo + hi for s, (lo, hi) in zip(shape, pads))
    count = np.zeros(padded_shape, np.float32)
    for d, h, w in starts:
        count[d : d + roi[0], h : h + roi[1], w : w + roi[2]] += weight

    if mesh is None:
        put_batch = put_volume = jax.device_put
    else:
        put_batch = partial(jax.device_put, device=NamedSharding(mesh, P("data")))
        put_volume = partial(jax.device_put, device=NamedSharding(mesh, P()))
    pad_width = (*pads, (0, 0))
    if isinstance(image, np.ndarray) or stitch_on_host:
        volume = np.pad(np.asarray(image), pad_width, constant_values=pad_value)
    else:
        volume = jnp.pad(image, pad_width, constant_values=pad_value)
    if not stitch_on_host:
        volume = put_volume(volume)
        weight_dev = put_volume(weight)
    modality_ids = put_batch(np.full((windows_per_call,), modality, np.int32))

    def window(v, start):
        d, h, w = start
        return v[d : d + roi[0], h : h + roi[1], w : w + roi[2]]

    out, pending = None, None
    for first in range(0, len(starts), windows_per_call):
        chunk = starts[first : first + windows_per_call]
        n_valid = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], windows_per_call - n_valid, axis=0)])
        if stitch_on_host:
            windows = put_batch(np.stack([window(volume, s) for s in chunk]))
        else:
            chunk = put_volume(chunk)
            windows = put_batch(_extract(volume, chunk, roi))
        logits = predict_fn(windows, modality_ids)
        if out is None:
            _check_logits(logits, (windows_per_call, *roi), image.shape[-1], num_classes)
            out_shape = (*padded_shape, int(logits.shape[-1]))
            if stitch_on_host:
                out = np.zeros(out_shape, np.float32)
            else:
                out = put_volume(jnp.zeros(out_shape, jnp.float32))
        if not stitch_on_host:
            out = _accumulate(out, logits, chunk, np.int32(n_valid), weight_dev)
            continue
        # Stitch the previous call's windows while the device computes this one.
        if pending is not None:
            _stitch_on_host(out, *pending, weight, window)
        pending = (logits, chunk[:n_valid])
    if stitch_on_host:
        _stitch_on_host(out, *pending, weight, window)
        out /= count[..., None]
        return out[tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))]
    return _normalise(out, put_volume(count), pads, shape)


def _check_logits(
    logits: jax.Array, expected: tuple[int, ...], channels: int, num_classes: int | None
) -> None:
    if logits.ndim != 5 or tuple(logits.shape[:4]) != expected:
        raise ValueError(
            f"predict_fn must map windows {(*expected, channels)} to logits {(*expected, 'K')} "
            f"(same spatial size, channels last); got {tuple(logits.shape)}."
        )
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(
            f"predict_fn returned {logits.shape[-1]} classes, expected num_classes={num_classes}."
        )


def _stitch_on_host(
    out: np.ndarray, logits: jax.Array, starts: np.ndarray, weight: np.ndarray, window: Callable
) -> None:
    """Add one call's weighted window predictions (the valid ones) into the host output, in order."""
    logits = np.asarray(logits, np.float32)
    for start, p in zip(starts, logits):
        window(out, start)[...] += p * weight[..., None]


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    """How a volume is cut into windows and stitched back (:func:`sliding_window_inference`)."""

    roi: Triple
    overlap: float | tuple[float, float, float] = 0.5
    windows_per_call: int = 4
    blend: Blend = "constant"
    sigma_scale: float = 0.125
    stitch_on_host: bool = False
    pad_value: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "roi", triple(self.roi, "roi"))
        _triple_overlap(self.overlap)
        if self.windows_per_call < 1:
            raise ValueError(f"windows_per_call must be >= 1, got {self.windows_per_call}.")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {self.blend!r}.")


class Prediction(NamedTuple):
    labels: np.ndarray  # (D, H, W) uint8 argmax over classes
    logits: np.ndarray | jax.Array  # (D, H, W, K) fp32


def predict_volume(
    predict_fn: PredictFn,
    image: np.ndarray | jax.Array,
    modality: int,
    settings: WindowSettings,
    *,
    num_classes: int | None = None,
    mesh: Mesh | None = None,
) -> Prediction:
    """Sliding-window logits and their argmax labels (uint8, on host).

    With device stitching the argmax runs on the device and only the labels are copied to the host.
    """
    logits = sliding_window_inference(
        predict_fn, image, modality, num_classes=num_classes, mesh=mesh, **dataclasses.asdict(settings)
    )
    if logits.shape[-1] > 256:
        raise ValueError(f"{logits.shape[-1]} classes do not fit uint8 labels.")
    xp = np if isinstance(logits, np.ndarray) else jnp
    return Prediction(np.asarray(xp.argmax(logits, axis=-1)).astype(np.uint8), logits)
