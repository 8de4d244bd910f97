"""The benchmark studies through the real CLI, tiny: `python -m benchmarks.ablation` (two variants, one
seed, two steps) writes valid JSON, Markdown and a PNG, and a second invocation reruns no finished cell;
`python -m benchmarks.single_source` (style training with the InfoNCE term) writes valid JSON,
with `--projection` reaching the InfoNCE variants alone."""

import json
import math
import os

import pytest
from _cli import REPO, run_module
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


def test_tiny_single_source_run_writes_json(tmp_path):
    out = tmp_path / "study"
    args = ["--out", str(out), "--tiny", "--seeds", "0", "--variants", "ct_to_mr_style_nce"]
    args += ["--projection", "8"]
    args += [
        "--set",
        f"config.data.root={tmp_path / 'phantom'}",
        "--set",
        f"config.data.cache_dir={tmp_path / 'c'}",
    ]
    run_module(args, devices=1, module="benchmarks.single_source")
    doc = json.load(open(out / "single_source.json"))
    (cell,) = doc["variants"]["ct_to_mr_style_nce"]["cells"]
    assert cell["seed"] == 0 and set(cell["modalities"]) == {"CT", "MR"}
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in cell["modalities"].values())
    config = json.load(open(out / "runs" / "ct_to_mr_style_nce" / "seed0" / "phase0" / "config.json"))
    assert config["style"]["enabled"] and config["style"]["info_nce_weight"] == 0.1
    assert config["style"]["info_nce_projection"] == 8 and doc["info_nce_projection"] == 8
    assert config["loader"]["mode"] == "single" and config["loader"]["single_modality_name"] == "CT"
    train = [
        json.loads(line)
        for line in open(out / "runs" / "ct_to_mr_style_nce" / "seed0" / "phase0" / "metrics.jsonl")
    ]
    logged = [r for r in train if r["stream"] == "train"]
    assert logged and all(r["info_nce"] > 0 for r in logged)  # the term is computed and logged


def test_single_source_projection_reaches_only_the_info_nce_variants(tmp_path, monkeypatch):
    """``--projection N`` adds the head override to the InfoNCE variants only; a negative width fails."""
    monkeypatch.syspath_prepend(REPO)
    from benchmarks import single_source

    head = "config.style.info_nce_projection=16"
    for projection in (0, 16):
        for v in single_source.variants(4, 0.1, projection):
            overrides = [o for phase in v.phases for o in phase.overrides]
            assert (head in overrides) == (projection == 16 and v.name.endswith("_style_nce")), v.name
    with pytest.raises(SystemExit):
        single_source.main(["--out", str(tmp_path / "s"), "--projection", "-1"])
