"""The throughput benchmark (``python -m benchmarks.throughput``) on its tiny config: the JSON contract and
the PyTorch references' model sizes. Timings are not checked (they belong in benchmarks/RESULTS.md)."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinjax import hostmem
from cinjax.models import build_model, presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("CINJAX_TEST_JAX_CACHE", os.path.expanduser("~/.cache/cinjax/jax-test-cache"))


def _load(path: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{os.path.basename(path)[:-3]}", os.path.join(REPO, path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        "--config",
        "configs/bench.py:tiny",
        "--reference",
        "torch",
        "--out",
        str(out),
        f"--config.compile_cache_dir={CACHE}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_headlines_follow_the_contract(results):
    train, inference, loader, env = (results[k] for k in ("train", "inference", "loader", "env"))
    for key in ("crops_per_s", "step_s", "tflops_per_s"):
        assert _positive(train[key]), (key, train[key])
    assert "mfu" in train and train["mfu"] is None  # no CPU peak unless config.peak_tflops is set
    assert _positive(inference["volumes_per_min"])
    assert _positive(loader["crops_per_s"])
    assert env["device_kind"] and env["jax"] == jax.__version__
    assert env["device_count"] == 1 and "xla_force_host_platform_device_count=1" in env["xla_flags"]
    # The command restarted itself with glibc's huge-page tunable where it applies, as the CLI does.
    restart = hostmem.restart_environment(_env())
    assert env["huge_pages"] == hostmem.huge_pages_requested(restart or _env())
    assert env["glibc_tunables"] == (restart or _env()).get("GLIBC_TUNABLES", "")


def test_cases_carry_the_details(results):
    train, sw = results["cases"]
    assert (train["kind"], sw["kind"]) == ("train", "inference")
    assert _positive(train["flops_per_step"]) and train["memory"]["estimated_peak_bytes"] > 0
    assert train["synthetic"]["crops_per_s"] == results["train"]["crops_per_s"]
    assert 0 <= train["pipeline"]["data_wait_share"] <= 1 and _positive(train["pipeline"]["crops_per_s"])
    assert train["input_only"] == results["loader"]
    compile_times = train["compile"]
    assert _positive(compile_times["cold_s"]) and _positive(compile_times["warm_s"])
    assert compile_times["warm_cache_hit"]
    assert sw["windows"] == 18
    assert [r["windows_per_call"] for r in sw["by_windows_per_call"]] == [1, 2]
    assert sw["volumes_per_min"] == max(r["volumes_per_min"] for r in sw["by_windows_per_call"])
    assert all(
        _positive(r["flops_per_call"]) and r["calls"] == 18 // r["windows_per_call"]
        for r in sw["by_windows_per_call"]
    )


def test_reference_fields_and_ratios(results):
    train, inference = results["train"], results["inference"]
    ref = train["reference"]
    assert _positive(ref["crops_per_s"]) and _positive(ref["step_s"]) and ref["threads"] >= 1
    assert ref["params"] == train["params"]
    assert train["ratio_vs_reference"] == pytest.approx(train["crops_per_s"] / ref["crops_per_s"])
    assert _positive(inference["reference"]["volumes_per_min"])
    assert inference["ratio_vs_reference"] == pytest.approx(
        inference["volumes_per_min"] / inference["reference"]["volumes_per_min"]
    )
    assert "reference_sync_free" not in train  # GPU only
    assert results["env"]["torch"]


def test_train_cases_are_also_timed_interleaved_with_the_reference(results):
    """On the CPU each train case is also timed one cinjax step and one PyTorch step in turn."""
    case = results["cases"][0]
    inter = case["reference_interleaved"]
    repeats = results["settings"]["repeats"]
    assert len(inter["step_s_all"]) == len(inter["cinjax_step_s_all"]) == repeats
    assert all(_positive(t) for t in inter["step_s_all"] + inter["cinjax_step_s_all"])
    assert inter["step_s"] == pytest.approx(statistics.median(inter["step_s_all"]))
    assert inter["crops_per_s"] == pytest.approx(case["batch_size"] / inter["step_s"])
    assert case["ratio_vs_reference_interleaved"] == pytest.approx(inter["step_s"] / inter["cinjax_step_s"])
    assert results["train"]["ratio_vs_reference_interleaved"] == case["ratio_vs_reference_interleaved"]
    assert "reference_interleaved" not in results["cases"][1]  # inference keeps the before / after brackets


def test_helpers_without_torch():
    """Importing the benchmark leaves torch alone; cost analyses as a dict, a list or without FLOPs."""
    script = """
import sys
from benchmarks import throughput as t
assert "torch" not in sys.modules
Fake = lambda a: type("C", (), {"cost_analysis": lambda self: a})()
assert t.cost_of(Fake({"flops": 8.0, "bytes accessed": 2.0})) == {"flops": 8.0, "bytes_accessed": 2.0}
assert t.cost_of(Fake([{"flops": 3.0}]))["flops"] == 3.0
assert t.cost_of(Fake({"bytes accessed": 1.0}))["flops"] is None
assert t.cost_of(Fake(None))["flops"] is None
assert t.peak_flops("NVIDIA H200", "bfloat16") == (989e12, "table: H200 bfloat16")
assert t.peak_flops("cpu", "float32")[0] is None and t.peak_flops("cpu", "float32", 2.0)[0] == 2e12
import ml_collections
product = ml_collections.ConfigDict({"model": {"conv_impl": "auto", "attention_impl": "auto"}, "seed": 1})
twin = t.loop_free_twin(product)
assert (twin.model.conv_impl, twin.model.attention_impl, twin.seed) == ("lax", "plain", 1)
assert product.model.conv_impl == "auto"  # a copy
unet = ml_collections.ConfigDict({"model": {"conv_impl": "cpu"}})
assert "attention_impl" not in t.loop_free_twin(unet).model
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _tiny_unet():
    m = presets.c_unet()
    m.channels, m.strides, m.num_res_units = (4, 8, 16), (1, 2, 2), 2
    return m


@pytest.mark.parametrize(
    "model, roi",
    [(_tiny_unet(), (16, 16, 16)), (presets.c_swin_unetr(12, 3), (32, 32, 64))],
    ids=["c_unet", "c_swin_unetr_fs12"],
)
def test_torch_references_have_the_cinjax_parameter_count(model, roi):
    torch_reference = _load("benchmarks/torch_reference.py")
    cfg = model.to_dict()
    n_torch = sum(p.numel() for p in torch_reference.build(cfg).parameters())
    x = jax.ShapeDtypeStruct((1, *roi, 1), jnp.float32)
    m = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(build_model(cfg).init, jax.random.key(0), x, m)["params"]
    assert n_torch == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) > 0


def test_bench_variants_build_valid_models():
    bench = _load("configs/bench.py")
    for variant in bench.VARIANTS:
        c = bench.get_config(variant)
        assert c.run and set(c.run) <= set(c.cases)
        for name in c.run:
            build_model(c.cases[name].model)
    with pytest.raises(ValueError, match="Unknown variant"):
        bench.get_config("tpu")
