"""cinjax.export: the jax.export artefacts of a run reproduce steps.predict_logits without model code.

Runs are converted-weights directories made without training (random, perturbed params of a tiny C-UNet
and C-Swin-UNETR); each is exported once per module.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cinjax import build, checkpointing, export, runspec, steps
from cinjax.config import base_config
from cinjax.models import presets
from cinjax.models.layers.attention import resolve_attention_impl
from cinjax.models.layers.conv import resolve_conv_impl
from cinjax.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _demo_model() -> dict:
    spec = importlib.util.spec_from_file_location("cinjax_test_demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.get_config().model.to_dict(), channels=(4, 8), strides=(1, 2), num_res_units=1)


# Swin-UNETR refuses 32^3 (its deepest grid would be one voxel): 32x32x64 is its smallest input.
MODELS = {
    "c_unet": (_demo_model, (16, 16, 16)),
    "c_swin_unetr": (lambda: presets.c_swin_unetr(12, 3).to_dict(), (32, 32, 64)),
}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)


def make_run(run_dir: Path, model_cfg: dict, roi: tuple[int, ...], seed: int = 0) -> runspec.InferenceSpec:
    """A converted-weights run directory: params/ (orbax), conversion.json, inference.json."""
    cfg = base_config()
    cfg.model = model_cfg
    cfg.data.roi = roi
    spec = runspec.InferenceSpec.from_config(cfg)
    run_dir.mkdir(parents=True)
    spec.write(run_dir)
    (run_dir / "conversion.json").write_text("{}")
    model = build.model_from_spec(spec)
    x = jax.ShapeDtypeStruct((1, *roi, spec.in_channels), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(seed), x, jax.ShapeDtypeStruct((1,), jnp.int32))
    # model.init's params, filled on the host (a compiled Swin init takes 60-90 s on 2 cores, mostly its
    # threefry RNG): fan-in scaled kernels, and norm scales and biases away from 1 / 0 that differ per
    # modality, so the modality changes the logits and the outputs are not trivial.
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, 1.5 / np.sqrt(np.prod(shape[:-1])), shape)
        if name == "scale":
            return 1 + 0.2 * rng.standard_normal(shape)
        if name == "negative_slope":
            return 0.25 + 0.05 * rng.standard_normal(shape)
        return 0.1 * rng.standard_normal(shape)

    params = jax.tree_util.tree_map_with_path(lambda p, a: fill(p, a).astype(np.float32), tree["params"])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((run_dir / "params").absolute(), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return spec


def _export(name: str, root: Path) -> tuple:
    """(name, spec, run dir, export dir, export info, restored variables, jitted reference)."""
    model_cfg, roi = MODELS[name]
    spec = make_run(root / "run", model_cfg(), roi)
    info = export.export(root / "run", root / "export", platforms=("cpu", "cuda"))
    restored = checkpointing.restore_inference_variables(root / "run")
    variables = {"params": restored.params, **restored.model_state}
    reference = jax.jit(functools.partial(steps.predict_logits, model=build.model_from_spec(spec)))
    return name, spec, root / "run", root / "export", info, variables, reference


@pytest.fixture(scope="module")
def c_unet(tmp_path_factory):
    return _export("c_unet", tmp_path_factory.mktemp("c_unet"))


@pytest.fixture(scope="module")
def c_swin_unetr(tmp_path_factory):
    return _export("c_swin_unetr", tmp_path_factory.mktemp("c_swin_unetr"))


@pytest.fixture(
    params=[pytest.param(name, marks=pytest.mark.slow) if name == "c_swin_unetr" else name for name in MODELS]
)
def exported(request):
    """Each model's export (made once per module). The Swin-UNETR one (a minute of CPU compiles; the
    C-UNet one runs the same export path) is kept out of CI: ``-m slow``."""
    return request.getfixturevalue(request.param)


def _windows(spec: runspec.InferenceSpec, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows, the third a copy of the first with the other modality."""
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(n, *spec.roi, spec.in_channels)).astype(np.float32)
    windows[2] = windows[0]
    return windows, np.array([0, 1, 1][:n], np.int32)


def _per_window(reference, variables, windows: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """steps.predict_logits one window per call, as the Predictor runs it on CPU."""
    return np.concatenate(
        [
            np.asarray(reference(variables, windows[i : i + 1], modality[i : i + 1]))
            for i in range(len(windows))
        ]
    )


def test_loaded_artefact_matches_the_predictor_at_two_batch_sizes(exported):
    """The contract: load(DIR)(windows, modality) == Predictor.window_logits == steps.predict_logits on
    the restored variables (bit-identical here; the bound is 1e-4), one symbolic-batch artefact for two
    batch sizes, both modality ids in each batch.

    The CPU artefact runs one window at a time, as the Predictor does on CPU; steps.predict_logits on a
    batch of windows rounds differently, which the tiny Swin-UNETR amplifies to 1.5e-4 (its deepest
    norms see 2 voxels), so the reference is per window (the UNet is also checked batched)."""
    name, spec, run, out, _, variables, reference = exported
    fn = export.load(out)
    assert fn.platform == "cpu" and jax.export.is_symbolic_dim(fn.exported.in_avals[-2].shape[0])
    windows, modality = _windows(spec)
    references = {
        "Predictor.window_logits": Predictor.from_run(run).window_logits(windows, modality),
        "steps.predict_logits per window": _per_window(reference, variables, windows, modality),
    }
    if name == "c_unet":
        references["steps.predict_logits batched"] = np.asarray(reference(variables, windows, modality))
    outputs = {}
    for n in (3, 2):
        outputs[n] = got = np.asarray(fn(windows[:n], modality[:n]))
        assert got.shape == (n, *spec.roi, spec.num_classes) and got.dtype == np.float32
        for what, want in references.items():
            err = float(np.max(np.abs(got - want[:n])))
            print(f"{name} N={n} max |export - {what}| = {err:.3g}")
            assert err <= TOL, (name, n, what, err)
    # Non-trivial logits that depend on the modality (windows 0 and 2 are the same image).
    assert float(np.std(outputs[3])) > 0.1
    assert float(np.max(np.abs(outputs[3][0] - outputs[3][2]))) > 1e-2


def test_export_json_preprocessing_and_weights(exported):
    name, spec, run, out, info, variables, _ = exported
    assert json.loads((out / "export.json").read_text()) == info
    assert set(os.listdir(out)) == {
        "export.json",
        "preprocessing.json",
        "weights.npz",
        *(f"model.{p}.jaxexport" for p in info["platforms"]),
    }
    assert "cpu" in info["platforms"] and set(info["platforms"]) | set(info["failed"]) == {"cpu", "cuda"}
    assert info["roi"] == list(spec.roi) and info["in_channels"] == spec.in_channels == 1
    assert info["num_classes"] == spec.num_classes and info["class_names"] == list(spec.class_names)
    assert info["modalities"] == {"CT": 0, "MR": 1} and info["model"] == spec.model["name"]
    assert info["source_run"] == str(run) and info["checkpoint"] == {
        "prefer": "best",
        "directory": str(run),  # converted weights: the directory that holds params/
        "step": None,
    }
    assert info["jax"] == jax.__version__ and info["jaxlib"]
    for platform, artefact in info["artefacts"].items():
        assert artefact["bytes"] == (out / artefact["file"]).stat().st_size > 0
        assert artefact["lowering"]["conv_impl"] == ("cpu" if platform == "cpu" else "lax")
        assert artefact["batching"] == ("map" if platform == "cpu" else "vmap")
        if name == "c_swin_unetr":
            assert artefact["lowering"]["attention_impl"] == ("blocked" if platform == "cpu" else "plain")
        assert jax.export.deserialize(bytearray((out / artefact["file"]).read_bytes())).platforms == (
            platform,
        )
    assert json.loads((out / "preprocessing.json").read_text()) == json.loads(
        json.dumps(spec.preprocessing())
    )
    assert info["weights"]["bytes"] == (out / "weights.npz").stat().st_size
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    with np.load(out / "weights.npz") as npz:
        assert set(npz.files) == {jax.tree_util.keystr(p) for p, _ in leaves} | {"__pytree__"}
        for path, leaf in leaves:
            np.testing.assert_array_equal(npz[jax.tree_util.keystr(path)], leaf)
    assert info["weights"]["parameters"] == sum(leaf.size for _, leaf in leaves)
    fn = export.load(out)
    assert fn.info == info and fn.preprocessing == json.loads((out / "preprocessing.json").read_text())
    print(name, {f: (out / f).stat().st_size for f in sorted(os.listdir(out))})


def test_loader_imports_no_model_code(c_unet):
    """A fresh interpreter loads and runs the export with jax and numpy only: no cinjax.models, no flax."""
    _, spec, _, out, _, variables, reference = c_unet
    windows, modality = _windows(spec)
    np.savez(out.parent / "inputs.npz", windows=windows, modality=modality)
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from cinjax.export import load
        inputs = np.load({str(out.parent / "inputs.npz")!r})
        fn = load({str(out)!r})
        np.save({str(out.parent / "logits.npy")!r}, np.asarray(fn(inputs["windows"], inputs["modality"])))
        heavy = ("cinjax.models", "cinjax.build", "cinjax.steps", "flax", "orbax")
        heavy = [m for m in heavy if m in sys.modules]
        assert not heavy, heavy
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out.parent / "logits.npy")
    assert float(np.max(np.abs(got - _per_window(reference, variables, windows, modality)))) <= TOL


def test_bad_inputs_give_clear_errors(c_unet):
    _, spec, _, out, _, _, _ = c_unet
    fn = export.load(out)
    windows, modality = _windows(spec)
    with pytest.raises(ValueError, match=r"be \(N, 16, 16, 16, 1\).*got shape \(3, 16, 16, 8, 1\)"):
        fn(windows[:, :, :, :8], modality)
    with pytest.raises(ValueError, match=r"windows must be .*got shape \(16, 16, 16, 1\)"):
        fn(windows[0], modality[:1])
    with pytest.raises(ValueError, match=r"one id per window, shape \(3,\); got shape \(2,\)"):
        fn(windows, modality[:2])
    with pytest.raises(ValueError, match=r"must hold integer ids"):
        fn(windows, modality.astype(np.float32))
    np.testing.assert_array_equal(fn(windows[:1], 1), fn(windows[:1], np.array([1], np.int32)))
    with pytest.raises(ValueError, match=r"Unknown modality id\(s\) \[5\]"):
        fn(windows, np.array([0, 1, 5], np.int32))
    with pytest.raises(ValueError, match=r"has no tpu artefact; available: \['cpu'"):
        export.load(out, platform="tpu")
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        export.load(out.parent / "run")


def test_cpu_lowering_is_what_auto_picks_on_cpu():
    assert jax.default_backend() == "cpu"
    assert export.LOWERINGS["cpu"] == {
        "conv_impl": resolve_conv_impl("auto"),
        "attention_impl": resolve_attention_impl("auto"),
    }


def test_a_platform_that_fails_is_recorded_and_warned(c_unet, tmp_path, monkeypatch):
    run = c_unet[2]
    real = jax.export.export

    def fake(fn, *, platforms, **kw):
        if platforms == ["cuda"]:
            raise RuntimeError("no cuda lowering here\nsecond line")
        return real(fn, platforms=platforms, **kw)

    monkeypatch.setattr(jax.export, "export", fake)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.tpu.jaxexport").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="cuda not exported: RuntimeError: no cuda lowering here"):
        info = export.export(run, tmp_path / "out")
    assert info["platforms"] == ["cpu"]
    assert info["failed"]["cuda"] == "RuntimeError: no cuda lowering here\nsecond line"
    assert not (tmp_path / "out" / "model.tpu.jaxexport").exists()  # stale artefact removed
    with pytest.raises(ValueError, match=r"no cuda artefact; available: \['cpu'\] \(cuda failed to export"):
        export.load(tmp_path / "out", platform="cuda")
    with pytest.warns(UserWarning), pytest.raises(export.ExportError, match="No platform could be exported"):
        export.export(run, tmp_path / "none", platforms="cuda")


def test_cli(c_unet, tmp_path):
    run = c_unet[2]
    cmd = [sys.executable, "-m", "cinjax.export", "--run", str(run), "--out", str(tmp_path / "cli")]
    proc = subprocess.run([*cmd, "--platforms", "cpu"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "cli" / "export.json").read_text())
    assert info["platforms"] == ["cpu"] and info["failed"] == {}
    for f in ("model.cpu.jaxexport", "weights.npz", "preprocessing.json", "export.json"):
        assert f in proc.stdout
    assert f"{info['weights']['parameters']:,} parameters" in proc.stdout

    for args, message in [
        (["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "is not a run directory"),
        (["--run", str(run), "--out", str(tmp_path / "x"), "--platforms", "cpu,gpu"], "Unknown platform"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "cinjax.export", *args], env=_env(), capture_output=True, text=True
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("cinjax.export: error: ") and message in last, proc.stderr
