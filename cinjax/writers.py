"""What users see while training: metrics.jsonl + TensorBoard, a progress bar, PNG slice panels.

Only the main process (process 0) writes; on other processes every writer is a no-op, so the
training loop calls them unconditionally.

``metrics.jsonl`` holds one JSON object per logged train step or evaluation; ``stream`` says which
(``"train"`` or ``"eval"``; TensorBoard has one run per stream under ``tb/<stream>/``)::

    {"step": 100, "stream": "train", "loss": 0.42, "lr": 0.0001, "crops_per_s": 11.3}
    {"step": 500, "stream": "eval", "mean_dice": 0.81, "CT/mean_dice": 0.84, "CT/LV/dice": 0.9}

Nested dicts are flattened with ``/``. Non-finite values (NaN, ±inf) are not valid JSON, so they
are written as ``null`` and named in a ``"nonfinite"`` entry, e.g.
``{"step": 7, "stream": "train", "loss": null, "nonfinite": {"loss": "nan"}}``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from cinjax import workdir as workdir_layout
from cinjax.distributed import is_main_process

RESERVED_KEYS = ("step", "stream", "nonfinite")


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported lazily and without PyTorch.

    tensorboardX's writer module tries ``import torch`` at import time, only so that it can accept torch
    tensors; where PyTorch is installed that import alone took 1.4 s of a 2-core CPU at every run's first
    logged step. cinjax logs numpy values, so while tensorboardX is imported ``torch`` is marked absent
    (and unmarked at once after). If torch is already loaded, tensorboardX simply finds it.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles.
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def _to_scalar(name: str, value: Any) -> bool | int | float | str:
    """Python scalar from a Python / numpy / jax scalar; strings pass through."""
    if isinstance(value, (str, bool, int, float)):
        return value
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise ValueError(
            f"Metric {name!r} must be a scalar number, got {arr.dtype} array of shape {arr.shape}."
            " Reduce it (e.g. mean) before logging."
        )
    return arr.reshape(()).item()


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class MetricWriter:
    """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard (``<workdir>/tb/<stream>/``).

    Args:
      workdir: the run's workdir.
      is_main: whether this process writes; default: process 0 only.
      tensorboard: also write TensorBoard event files (tensorboardX, no TensorFlow needed).
      flush_secs: how often TensorBoard flushes to disk in the background.

    The JSONL file is opened for appending and line-buffered, so a crash loses at most the line
    being written and a resumed run continues the same file (see ``drop_after``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        is_main: bool | None = None,
        tensorboard: bool = True,
        flush_secs: int = 30,
    ):
        self.is_main = is_main_process() if is_main is None else bool(is_main)
        self.workdir = os.fspath(workdir)
        self.jsonl_path = os.path.join(self.workdir, workdir_layout.METRICS)
        self.tb_dir = os.path.join(self.workdir, workdir_layout.TENSORBOARD)
        self._tensorboard = tensorboard
        self._flush_secs = flush_secs
        self._tb_writers: dict[str, Any] = {}
        self._jsonl: IO[str] | None = None
        if self.is_main:
            os.makedirs(self.workdir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", buffering=1)

    def _tb(self, stream: str):
        if stream not in self._tb_writers:
            self._tb_writers[stream] = summary_writer_class()(
                logdir=os.path.join(self.tb_dir, stream), flush_secs=self._flush_secs
            )
        return self._tb_writers[stream]

    def write_scalars(self, step: int, scalars: Mapping[str, Any], stream: str = "train") -> None:
        """Logs one record: ``{"step": step, "stream": stream, **flattened scalars}``."""
        if not self.is_main:
            return
        record: dict[str, Any] = {"step": int(step), "stream": stream}
        nonfinite: dict[str, str] = {}
        numeric: dict[str, float] = {}
        for name, value in _flatten(scalars).items():
            if name in RESERVED_KEYS:
                raise ValueError(f"Metric name {name!r} is reserved ({RESERVED_KEYS}); rename it.")
            value = _to_scalar(name, value)
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite[name] = _nonfinite_name(value)
                record[name] = None
            else:
                record[name] = value
            if not isinstance(value, str):
                numeric[name] = float(value)
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tensorboard:
            writer = self._tb(stream)
            for name, value in numeric.items():
                writer.add_scalar(name, value, int(step))

    def drop_after(self, step: int) -> None:
        """Removes JSONL records with a step after ``step`` (call after resuming from ``step``).

        The steps between the restored checkpoint and a crash are trained again; without this
        they would appear twice in ``metrics.jsonl``.
        """
        if not self.is_main:
            return
        self._jsonl.close()
        with open(self.jsonl_path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by a crash
                continue
        tmp = f"{self.jsonl_path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)

    def flush(self) -> None:
        """Pushes buffered JSONL and TensorBoard data to disk."""
        if not self.is_main:
            return
        self._jsonl.flush()
        for writer in self._tb_writers.values():
            writer.flush()

    def close(self) -> None:
        """Flushes and closes all files (idempotent)."""
        if not self.is_main or self._jsonl is None:
            return
        self.flush()
        for writer in self._tb_writers.values():
            writer.close()
        self._tb_writers.clear()
        self._jsonl.close()
        self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Progress bar.
# ---------------------------------------------------------------------------


class ProgressBar:
    """Training progress: step/total, loss, crops/s, data-wait per step, ETA.

    On a terminal it is a tqdm bar. When the output is not a TTY (CI logs, ``nohup``, SLURM
    ``.out`` files) it prints one plain line every ``log_every`` steps instead of carriage-return
    updates. Rates are exponential moving averages over update calls, so the first (compiling)
    step does not dominate for long.

    Args:
      total: last step of training.
      initial: step training resumes from.
      crops_per_step: global batch size, to turn step time into crops/s (optional).
      is_main: whether this process shows progress; default: process 0 only.
      file: where to write; default ``sys.stderr``.
      log_every: non-TTY line interval in steps; default about 20 lines over the run (1–100).
      desc: label shown in front.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        crops_per_step: int | None = None,
        is_main: bool | None = None,
        file: IO[str] | None = None,
        log_every: int | None = None,
        desc: str = "train",
    ):
        self.is_main = is_main_process() if is_main is None else bool(is_main)
        self.total = int(total)
        self.step = int(initial)
        self._crops_per_step = crops_per_step
        self._file = file if file is not None else sys.stderr
        self._desc = desc
        self._log_every = log_every or max(1, min(100, (self.total - self.step) // 20))
        self._last_time: float | None = None
        self._ema_step_s: float | None = None
        self._ema_wait_s: float | None = None
        self._bar: tqdm | None = None
        self.tty = bool(getattr(self._file, "isatty", lambda: False)())
        if self.is_main and self.tty:
            self._bar = tqdm(
                total=self.total,
                initial=self.step,
                file=self._file,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    @staticmethod
    def _ema(old: float | None, new: float, alpha: float = 0.1) -> float:
        return new if old is None else (1 - alpha) * old + alpha * new

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        data_wait_s: float | None = None,
        **scalars: float,
    ) -> None:
        """Reports that ``step`` finished; ``data_wait_s`` is the time this step waited for data."""
        if not self.is_main:
            return
        now = time.perf_counter()
        step = int(step)
        advanced = step - self.step
        if self._last_time is not None and advanced > 0:
            self._ema_step_s = self._ema(self._ema_step_s, (now - self._last_time) / advanced)
        if data_wait_s is not None:
            self._ema_wait_s = self._ema(self._ema_wait_s, float(data_wait_s))
        self._last_time = now
        self.step = step
        fields = self._fields(loss, scalars)
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(fields), refresh=False)
            self._bar.update(max(advanced, 0))
        elif step % self._log_every == 0 or step >= self.total:
            line = f"{self._desc} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"
            eta = self.eta_s()
            tail = [f"ETA {tqdm.format_interval(eta)}"] if eta is not None else []
            print(" | ".join([line, *fields, *tail]), file=self._file, flush=True)

    def _fields(self, loss: float | None, scalars: Mapping[str, float]) -> list[str]:
        fields = []
        if loss is not None:
            fields.append(f"loss {float(loss):.4f}")
        for name, value in scalars.items():
            fields.append(f"{name} {float(value):.4g}")
        if self._ema_step_s:
            if self._crops_per_step:
                fields.append(f"{self._crops_per_step / self._ema_step_s:.1f} crops/s")
            fields.append(f"{self._ema_step_s:.3f} s/step")
        if self._ema_wait_s is not None:
            fields.append(f"data-wait {1e3 * self._ema_wait_s:.1f} ms/step")
        return fields

    def eta_s(self) -> float | None:
        """Estimated seconds to ``total`` from the smoothed step time (None before 2 updates)."""
        if self._ema_step_s is None:
            return None
        return max(self.total - self.step, 0) * self._ema_step_s

    def write(self, message: str) -> None:
        """Prints a message without breaking the bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._file)
        else:
            print(message, file=self._file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# PNG panels.
# ---------------------------------------------------------------------------

# Fixed RGB color per class index (0 = background, drawn without overlay); cycles past the end.
CLASS_COLORS = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (255, 225, 25),  # yellow
        (0, 130, 200),  # blue
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 240, 240),  # cyan
        (240, 50, 230),  # magenta
        (210, 245, 60),  # lime
        (250, 190, 212),  # pink
        (0, 128, 128),  # teal
        (170, 110, 40),  # brown
    ],
    dtype=np.uint8,
)
PANEL_PAD = 4  # pixels between tiles and around the border
PANEL_TITLE_H = 16  # pixels of the title bar
ROW_NAMES = ("image", "ground truth", "prediction")


def class_color(c: int) -> np.ndarray:
    """RGB color (uint8) of class ``c >= 1``."""
    if c < 1:
        raise ValueError(f"Class {c} has no color: class 0 is background.")
    return CLASS_COLORS[1 + (c - 1) % (len(CLASS_COLORS) - 1)]


def _palette(num_classes: int) -> np.ndarray:
    return np.stack([CLASS_COLORS[0]] + [class_color(c) for c in range(1, num_classes)])


def _to_gray(image: np.ndarray) -> np.ndarray:
    """Intensities → uint8 with a 1st–99th percentile window (robust to CT outliers)."""
    lo, hi = np.percentile(image, [1, 99])
    if not hi > lo:
        return np.zeros(image.shape, np.uint8)
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The middle 2D slice across each of the 3 axes of a (D, H, W) volume."""
    d, h, w = volume.shape
    return [volume[d // 2], volume[:, h // 2], volume[:, :, w // 2]]


def _check_volume(name: str, x: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) volume, got shape {x.shape}.")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, but the image has shape {shape}.")
    return x


def render_panel(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    *,
    title: str = "",
    num_classes: int,
    alpha: float = 0.5,
    scale: int = 2,
) -> Image.Image:
    """A 3×3 RGB panel: rows image / ground-truth overlay / prediction overlay, columns the
    middle slices across axes 0, 1, 2 (in a 2D slice, rows are the first remaining axis).

    Each slice is upsampled ``scale``× (nearest) and centered in a square tile of side
    ``max(D, H, W) * scale``; the panel is ``3 * tile + 4 * PANEL_PAD`` wide and
    ``PANEL_TITLE_H + 3 * tile + 4 * PANEL_PAD`` high. Labels blend ``alpha`` of the class color
    (``CLASS_COLORS``) over the gray image; background (0) is not colored.
    """
    image = _check_volume("image", image, None).astype(np.float32)
    label = _check_volume("label", label, image.shape).astype(np.int64)
    pred = _check_volume("pred", pred, image.shape).astype(np.int64)
    for name, lab in (("label", label), ("pred", pred)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(
                f"{name} holds classes {lab.min()}..{lab.max()}, outside 0..{num_classes - 1}"
                f" (num_classes={num_classes})."
            )
    palette = _palette(num_classes).astype(np.float32)
    gray = _to_gray(image)
    tile = max(image.shape) * scale
    width = 3 * tile + 4 * PANEL_PAD
    height = PANEL_TITLE_H + 3 * tile + 4 * PANEL_PAD
    canvas = np.zeros((height, width, 3), np.uint8)
    for col, (g, lab, prd) in enumerate(zip(mid_slices(gray), mid_slices(label), mid_slices(pred))):
        base = np.repeat(g[..., None], 3, axis=-1).astype(np.float32)
        rows = [base]
        for overlay in (lab, prd):
            blended = np.where((overlay > 0)[..., None], (1 - alpha) * base + alpha * palette[overlay], base)
            rows.append(blended)
        for row, rgb in enumerate(rows):
            rgb = np.repeat(np.repeat(rgb.round().astype(np.uint8), scale, 0), scale, 1)
            y0 = PANEL_TITLE_H + PANEL_PAD + row * (tile + PANEL_PAD) + (tile - rgb.shape[0]) // 2
            x0 = PANEL_PAD + col * (tile + PANEL_PAD) + (tile - rgb.shape[1]) // 2
            canvas[y0 : y0 + rgb.shape[0], x0 : x0 + rgb.shape[1]] = rgb
    panel = Image.fromarray(canvas, mode="RGB")
    text = f"{title}  [rows: {' / '.join(ROW_NAMES)}]" if title else f"rows: {' / '.join(ROW_NAMES)}"
    ImageDraw.Draw(panel).text((PANEL_PAD, 2), text, fill=(255, 255, 255), font=_font())
    return panel


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has no sized default font.
        return ImageFont.load_default()


def save_panel_png(
    path: str | os.PathLike[str],
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    *,
    title: str = "",
    num_classes: int,
    alpha: float = 0.5,
    scale: int = 2,
) -> str:
    """Renders ``render_panel`` to a PNG at ``path`` (parent dirs created); returns the path."""
    panel = render_panel(image, label, pred, title=title, num_classes=num_classes, alpha=alpha, scale=scale)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buffer = io.BytesIO()
    panel.save(buffer, format="PNG")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)
    return path


def save_modality_panels(
    out_dir: str | os.PathLike[str],
    step: int,
    samples_by_modality: Mapping[str, Sequence[np.ndarray]],
    *,
    num_classes: int,
    is_main: bool | None = None,
    scale: int = 2,
) -> list[str]:
    """Writes one panel per modality to ``<out_dir>/step_<step:06d>_<modality_name>.png``.

    ``samples_by_modality`` maps a modality name (e.g. ``"CT"``) to ``(image, label, pred)`` (host
    arrays, one volume each). Returns the written paths (empty on non-main processes).
    """
    if not (is_main_process() if is_main is None else is_main):
        return []
    paths = []
    for modality_name, (image, label, pred) in samples_by_modality.items():
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(modality_name))
        path = os.path.join(os.fspath(out_dir), f"step_{int(step):06d}_{safe_name}.png")
        paths.append(
            save_panel_png(
                path,
                image,
                label,
                pred,
                title=f"{modality_name} step {int(step)}",
                num_classes=num_classes,
                scale=scale,
            )
        )
    return paths
