"""`python -m benchmarks.ablation`: a tiny study (two variants, one seed, two steps) through the real CLI
writes valid JSON, Markdown and a PNG, and a second invocation reruns no finished cell."""

import json
import math
import os

from _cli import run_module
from PIL import Image


def test_tiny_ablation_writes_json_markdown_png_and_resumes(tmp_path):
    out = tmp_path / "study"
    args = ["--out", str(out), "--tiny", "--seeds", "0", "--variants", "ct_only,c_interleaved"]
    args += [
        "--set",
        f"config.data.root={tmp_path / 'phantom'}",
        "--set",
        f"config.data.cache_dir={tmp_path / 'c'}",
    ]
    run_module(args, devices=1, module="benchmarks.ablation")
    doc = json.load(open(out / "ablation.json"))
    assert list(doc["variants"]) == ["ct_only", "c_interleaved"] and doc["seeds"] == [0]
    assert doc["budget"]["steps"] == 2 and doc["command"].startswith("python -m benchmarks.ablation")
    for name, entry in doc["variants"].items():
        (cell,) = entry["cells"]
        assert cell["seed"] == 0 and cell["step"] == 2
        assert set(cell["modalities"]) == {"CT", "MR"}
        for m, r in cell["modalities"].items():
            assert 0.0 <= r["mean_dice"] <= 1.0
            assert set(r["classes"]) == {"LV", "RV", "LA", "RA", "Myo", "AA", "PA"}
            s = entry["summary"][m]["mean_dice"]
            assert s == {"mean": r["mean_dice"], "std": 0.0, "n": 1}
            assert math.isfinite(r["whole_heart_dice"])
        phases = [p["config"] for p in entry["phases"]]
        assert phases == [
            {"ct_only": "configs/ablation.py:unet,ct", "c_interleaved": "configs/ablation.py:c_unet"}[name]
        ]
        assert (out / "runs" / name / "seed0" / "cell.json").exists()
    table = (out / "ablation.md").read_text()
    assert "| ct_only |" in table and "| c_interleaved |" in table and "Dice per class, CT" in table
    with Image.open(out / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
        im.verify()

    logs = {p: os.path.getsize(p) for p in out.glob("runs/*/seed0/log.txt")}
    run_module(args, devices=1, module="benchmarks.ablation")  # every cell is done: nothing reruns
    assert {p: os.path.getsize(p) for p in out.glob("runs/*/seed0/log.txt")} == logs
    assert json.load(open(out / "ablation.json"))["variants"] == doc["variants"]
