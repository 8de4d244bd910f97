"""Writers: metrics.jsonl, TensorBoard event files, progress output, PNG panels, process-0 only."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from cinjax.writers import (
    CLASS_COLORS,
    PANEL_PAD,
    PANEL_TITLE_H,
    MetricWriter,
    ProgressBar,
    class_color,
    save_modality_panels,
    save_panel_png,
)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """Parses TFRecord framing (length, masked CRC32C, payload, masked CRC32C) into Events."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _masked_crc(header)
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked_crc(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    return events


def _scalars(events):
    return {
        (e.step, v.tag): v.simple_value
        for e in events
        for v in e.summary.value
        if v.WhichOneof("value") == "simple_value"
    }


def test_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, is_main=True) as writer:
        writer.write_scalars(1, {"loss": np.float32(0.5), "lr": jnp.asarray(1e-3), "n": np.int64(4)})
        writer.write_scalars(2, {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf})
        writer.write_scalars(2, {"mean_dice": 0.75, "CT": {"LV": {"dice": 0.9}}, "note": "ok"}, stream="eval")
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "stream": "train", "loss": 0.5, "lr": pytest.approx(1e-3), "n": 4}
    assert records[1] == {
        "step": 2,
        "stream": "train",
        "loss": None,
        "grad_norm": None,
        "x": None,
        "nonfinite": {"loss": "nan", "grad_norm": "inf", "x": "-inf"},
    }
    assert records[2] == {"step": 2, "stream": "eval", "mean_dice": 0.75, "CT/LV/dice": 0.9, "note": "ok"}

    (train_file,) = glob.glob(str(tmp_path / "tb" / "train" / "events.out.tfevents.*"))
    (eval_file,) = glob.glob(str(tmp_path / "tb" / "eval" / "events.out.tfevents.*"))
    train_events = _read_events(train_file)
    train = _scalars(train_events)
    assert train[(1, "loss")] == pytest.approx(0.5)
    assert train[(1, "n")] == 4.0
    assert math.isnan(train[(2, "loss")]) and train[(2, "grad_norm")] == math.inf
    assert _scalars(_read_events(eval_file))[(2, "CT/LV/dice")] == pytest.approx(0.9)


def test_tensorboard_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch at import time when it can (1.4 s at every run's first logged step);
    the writer keeps it out, and leaves ``import torch`` working afterwards."""
    code = (
        "import sys\n"
        "from cinjax.writers import MetricWriter\n"
        f"with MetricWriter({str(tmp_path)!r}, is_main=True) as w:\n"
        "    w.write_scalars(1, {'loss': 0.5})\n"
        "assert 'tensorboardX.writer' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
        "import torch\n"
        "print('ok', torch.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok torch" in proc.stdout, proc.stderr[-3000:]
    assert glob.glob(str(tmp_path / "tb" / "train" / "events.out.tfevents.*"))


def test_jsonl_rejects_arrays_and_reserved_names(tmp_path):
    with MetricWriter(tmp_path, is_main=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="must be a scalar"):
            writer.write_scalars(1, {"dice": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write_scalars(1, {"step": 3})
    assert not os.path.exists(tmp_path / "tb")


def test_resume_appends_and_drops_replayed_steps(tmp_path):
    with MetricWriter(tmp_path, is_main=True, tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.write_scalars(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "spl')  # a line cut short by a crash
    with MetricWriter(tmp_path, is_main=True, tensorboard=False) as writer:
        writer.drop_after(2)  # resumed from the step-2 checkpoint
        writer.write_scalars(3, {"loss": 0.3})
    assert [(r["step"], r["loss"]) for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.3),
    ]


def test_non_main_process_writes_nothing(tmp_path):
    with MetricWriter(tmp_path / "w", is_main=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.drop_after(0)
    image = np.zeros((8, 8, 8), np.float32)
    assert (
        save_modality_panels(tmp_path / "w", 1, {"CT": (image, image, image)}, num_classes=2, is_main=False)
        == []
    )
    out = io.StringIO()
    bar = ProgressBar(10, is_main=False, file=out, log_every=1)
    bar.update(1, loss=0.1)
    bar.write("hello")
    bar.close()
    assert not os.path.exists(tmp_path / "w") and out.getvalue() == ""


def test_progress_lines_when_not_a_tty():
    out = io.StringIO()  # not a TTY: plain lines, no carriage returns
    bar = ProgressBar(10, initial=2, crops_per_step=4, file=out, log_every=4, desc="train")
    for step in range(3, 11):
        bar.update(step, loss=1.0 / step, data_wait_s=0.002)
    bar.write("eval done")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" | ")[0] for line in lines[:3]] == [
        "train step 4/10 (40%)",
        "train step 8/10 (80%)",
        "train step 10/10 (100%)",
    ]
    assert "loss 0.2500" in lines[0] and "data-wait 2.0 ms/step" in lines[0]
    assert "crops/s" in lines[0] and "ETA" in lines[0]
    assert lines[2].endswith("ETA 00:00") and lines[3] == "eval done"


def test_progress_bar_on_a_tty():
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    out = FakeTTY()
    with ProgressBar(5, file=out, crops_per_step=2) as bar:
        assert bar.tty
        for step in range(1, 6):
            bar.update(step, loss=0.5, data_wait_s=0.001)
    text = out.getvalue()
    assert "5/5" in text and "loss 0.5000" in text and "crops/s" in text


def _tile_region(row: int, col: int, tile: int) -> tuple[slice, slice]:
    y0 = PANEL_TITLE_H + PANEL_PAD + row * (tile + PANEL_PAD)
    x0 = PANEL_PAD + col * (tile + PANEL_PAD)
    return slice(y0, y0 + tile), slice(x0, x0 + tile)


def test_panel_size_and_class_colors(tmp_path):
    shape, scale, num_classes = (12, 16, 20), 2, 4
    image = np.zeros(shape, np.float32)  # black image: overlay pixels are exactly alpha * color
    label = np.zeros(shape, np.int32)
    label[4:8, 5:11, 6:14] = 1
    label[2:10, 2:4, 2:18] = 3
    pred = np.zeros(shape, np.int32)
    pred[5:9, 6:12, 7:15] = 2
    path = save_panel_png(
        tmp_path / "p.png", image, label, pred, title="CT", num_classes=num_classes, scale=scale
    )
    panel = np.asarray(Image.open(path).convert("RGB"))
    tile = max(shape) * scale
    assert panel.shape == (PANEL_TITLE_H + 3 * tile + 4 * PANEL_PAD, 3 * tile + 4 * PANEL_PAD, 3)

    def expected_count(vol, c, axis):
        mid = np.take(vol, vol.shape[axis] // 2, axis=axis)
        return int((mid == c).sum()) * scale * scale

    def count(region, c):
        color = np.round(0.5 * class_color(c).astype(np.float32)).astype(np.uint8)
        return int(np.all(panel[region] == color, axis=-1).sum())

    for axis in range(3):
        for c in range(1, num_classes):
            assert count(_tile_region(1, axis, tile), c) == expected_count(label, c, axis)
            assert count(_tile_region(2, axis, tile), c) == expected_count(pred, c, axis)
        assert not panel[_tile_region(0, axis, tile)].any()  # image row: black, no overlay
    assert expected_count(label, 3, 0) > 0 and expected_count(pred, 2, 2) > 0
    assert len({tuple(class_color(c)) for c in range(1, len(CLASS_COLORS))}) == len(CLASS_COLORS) - 1


def test_panel_gray_levels_and_validation(tmp_path):
    image = np.broadcast_to(np.arange(64, dtype=np.float32).reshape(1, 8, 8), (8, 8, 8)).copy()
    image[0, 0, 0] = 1e6  # one outlier must not squash the 1st-99th percentile window
    label = np.zeros((8, 8, 8), np.int32)
    path = save_panel_png(tmp_path / "g.png", image, label, label, num_classes=2, scale=1)
    panel = np.asarray(Image.open(path).convert("RGB"))
    gray = panel[_tile_region(0, 0, 8)][..., 0].astype(int)  # axis-0 mid slice: values 0..63
    assert gray[0, 0] == 0 and gray[-1, -1] == 255
    assert np.all(np.diff(gray.reshape(-1)) >= 0) and len(np.unique(gray)) > 50
    with pytest.raises(ValueError, match="outside 0..1"):
        save_panel_png(tmp_path / "bad.png", image, label + 2, label, num_classes=2)
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        save_panel_png(tmp_path / "bad.png", image, label[0], label, num_classes=2)


def test_modality_panels_paths(tmp_path):
    vol = np.zeros((8, 8, 8), np.float32)
    lab = np.zeros((8, 8, 8), np.int32)
    lab[3:5, 3:5, 3:5] = 1
    panels_dir = tmp_path / "eval" / "panels"
    paths = save_modality_panels(
        panels_dir,
        120,
        {"CT": (vol, lab, lab), "MR/T2": (vol[..., None], lab, lab)},
        num_classes=2,
        is_main=True,
    )
    assert paths == [str(panels_dir / "step_000120_CT.png"), str(panels_dir / "step_000120_MR_T2.png")]
    for p in paths:
        assert Image.open(p).format == "PNG"
