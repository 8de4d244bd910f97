"""MI-Seg weight import: strict loads of the released architectures' key sets (from MI-Seg's own
state-dict listing), wrappers / prefixes, corrupted key sets, non-strict loads, the CLI round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mi_seg import unet_state_dict
from flax import traverse_util

from cinjax.models import presets
from cinjax.models.convert import (
    CheckpointMismatchError,
    load_mi_seg,
    mi_seg_args_to_config,
    parse_mi_seg_args,
)

# MI-Seg's own state-dict listing (key, shape, dtype per released architecture), shipped with the tests.
KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "mi-seg-state-dict-keys.txt")

TINY_ARGS = [
    "--model_name=unet_vanilla",
    "--encoder_norm_name=instance_cond",
    "--feature_size",
    "4",
    "8",
    "16",
    "--strides",
    "1",
    "2",
    "1",
    "--num_res_units=1",
    "--out_channels=3",
]


def keys_section(name: str) -> tuple[list[str], dict[str, tuple[tuple[int, ...], str]]]:
    """(argv, {key: (shape, dtype)}) of one ``## [name]`` section of MI-Seg's state-dict listing."""
    argv, keys, on = None, {}, False
    with open(KEYS_FILE) as f:
        for line in f:
            if line.startswith("## ["):
                on = line.strip() == f"## [{name}]"
            elif on and line.startswith("## argv:"):
                argv = line.split("argv:", 1)[1].split()
            elif on and line.strip() and not line.startswith("#"):
                key, shape, dtype, _ = line.rstrip("\n").split("\t")
                keys[key] = (tuple(int(i) for i in shape.strip("[]").split(",") if i.strip()), dtype)
    assert argv and keys, f"section {name} not found in {KEYS_FILE}"
    return argv, keys


def random_state_dict(keys, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(shape).astype(np.float32) if dtype == "float32" else np.zeros(shape, np.int64)
        for k, (shape, dtype) in keys.items()
    }


def _n_params(params):
    return sum(np.size(p) for p in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def unet_best():
    argv, keys = keys_section("unet_vanilla_readme_best")
    return argv, random_state_dict(keys)


def test_readme_best_unet_loads_strictly(unet_best):
    argv, sd = unet_best
    model, params, report = load_mi_seg(sd, argv, return_report=True)
    assert report.ok and len(report.loaded) == 228
    assert _n_params(params) == 62_562_904
    flat = traverse_util.flatten_dict(params)
    # Spot-check layouts: conv OIDHW → DHWIO, CIN rows stacked per modality, PReLU (1,) → scalar.
    np.testing.assert_array_equal(
        flat[("down_0_0", "unit0", "conv", "kernel")],
        np.transpose(sd["down_path.0.0.conv.unit0.conv.weight"], (2, 3, 4, 1, 0)),
    )
    np.testing.assert_array_equal(
        flat[("down_3_2", "unit1", "norm", "scale")][1], sd["down_path.3.2.conv.unit1.adn.N.norms.1.weight"]
    )
    np.testing.assert_array_equal(
        flat[("up_2", "unit0", "norm", "bias")], sd["up_path.2.1.conv.unit0.adn.N.bias"]
    )
    assert flat[("up_0", "unit1", "act", "negative_slope")] == sd["up_path.0.1.conv.unit1.adn.A.weight"][0]
    np.testing.assert_array_equal(
        flat[("up_3", "residual", "kernel")][0, 0, 0], sd["up_path.3.1.residual.weight"][:, :, 0, 0, 0].T
    )


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 10, "best_acc": 0.9},
        lambda sd: {f"model.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "lightning_prefix", "ddp_prefix"],
)
def test_wrappers_and_prefixes(unet_best, wrap):
    argv, sd = unet_best
    _, params, report = load_mi_seg(wrap(sd), argv, return_report=True)
    assert report.ok
    np.testing.assert_array_equal(params["out"]["bias"], sd["out.conv.bias"])


def test_corrupted_key_set_is_reported(unet_best):
    argv, sd = unet_best
    bad = dict(sd)
    del bad["down_path.1.2.conv.unit0.conv.bias"]
    bad["down_path.9.0.conv.unit0.conv.weight"] = np.zeros((1,), np.float32)
    bad["up_path.1.1.residual.weight"] = np.zeros((128, 384, 3, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        load_mi_seg(bad, argv)
    report = err.value.report
    assert report.missing == ["down_path.1.2.conv.unit0.conv.bias"]
    assert report.unexpected == ["down_path.9.0.conv.unit0.conv.weight"]
    assert [m[0] for m in report.mismatched] == ["up_path.1.1.residual.weight"]
    text = str(err.value)
    for key in (
        "down_path.1.2.conv.unit0.conv.bias",
        "down_path.9.0.conv.unit0.conv.weight",
        "up_path.1.1.residual.weight",
        "strict=False",
    ):
        assert key in text


def test_wrong_flags_are_reported(unet_best):
    argv, sd = unet_best
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_mi_seg(sd, [a if a != "--out_channels=8" else "--out_channels=6" for a in argv])
    # Plain instance norm in the encoder: the checkpoint's CIN rows are unexpected, weight/bias missing.
    with pytest.raises(CheckpointMismatchError) as err:
        load_mi_seg(sd, [a for a in argv if "encoder_norm" not in a])
    assert "down_path.0.0.conv.unit0.adn.N.norms.0.weight" in err.value.report.unexpected
    assert "down_path.0.0.conv.unit0.adn.N.weight" in err.value.report.missing


@pytest.fixture(scope="module")
def tiny():
    """A small C-UNet state dict made by the converter's inverse: random params → MI-Seg keys."""
    config = mi_seg_args_to_config(TINY_ARGS)
    from cinjax.models import build_model

    model = build_model(config)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 8, 1)), jnp.float32)
    modality = jnp.array([0, 1], jnp.int32)
    rng = np.random.default_rng(7)
    params = jax.tree.map(
        lambda p: (0.3 * rng.standard_normal(p.shape)).astype(np.float32),
        jax.eval_shape(model.init, jax.random.key(1), x, modality)["params"],
    )
    sd = unet_state_dict(params)
    logits = jax.jit(model.apply)({"params": params}, x, modality)
    return dict(sd=sd, params=params, x=x, modality=modality, logits=np.asarray(logits))


def test_small_model_strict_load_and_forward(tiny):
    model, params = load_mi_seg(tiny["sd"], TINY_ARGS)
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, tiny["params"]))
    out = jax.jit(model.apply)({"params": params}, tiny["x"], tiny["modality"])
    np.testing.assert_allclose(out, tiny["logits"], rtol=1e-6, atol=1e-6)


def test_non_strict_load_keeps_what_fits(tiny, caplog):
    sd = dict(tiny["sd"])
    del sd["out.conv.bias"]
    sd["out.conv.weight"] = np.zeros((5, 4, 1, 1, 1), np.float32)
    sd["extra.weight"] = np.zeros((2,), np.float32)
    model, params, report = load_mi_seg(sd, TINY_ARGS, strict=False, return_report=True)
    assert report.missing == ["out.conv.bias"] and report.unexpected == ["extra.weight"]
    assert len(report.mismatched) == 1
    assert "Non-strict load" in caplog.text
    np.testing.assert_array_equal(params["pre_conv"]["kernel"], tiny["params"]["pre_conv"]["kernel"])
    assert params["out"]["kernel"].shape == (1, 1, 1, 4, 3) and params["out"]["bias"].shape == (3,)
    out = jax.jit(model.apply)({"params": params}, tiny["x"], tiny["modality"])
    assert np.isfinite(np.asarray(out)).all()


def test_num_modalities_override(tiny):
    with pytest.raises(CheckpointMismatchError) as err:
        load_mi_seg(tiny["sd"], TINY_ARGS, num_modalities=3)
    assert "down_path.0.0.conv.unit0.adn.N.norms.2.weight" in err.value.report.missing


def test_mi_seg_flag_parsing():
    a = parse_mi_seg_args(["--model=swin_unetr", "--feature_size=36", "--lr", "1e-3", "--checkpoint", "x.pt"])
    assert a["model_name"] == "swin_unetr" and a["feature_size"] == [36] and a["in_channels"] == 1
    assert a["num_styles"] == 2 and a["out_channels"] == 14 and a["depth_swin_block"] == [2]
    cfg = mi_seg_args_to_config(
        {
            "model_name": "unet_vanilla",
            "feature_size": [4, 8],
            "strides": [1, 2],
            "decoder_norm_no_affine": True,
            "encoder_norm_name": "instance_cond",
        }
    )
    assert cfg.channels == (4, 8) and cfg.norm_affine is False and cfg.encoder_norm == "instance_cond"
    swin = mi_seg_args_to_config(
        {
            "model_name": "swin_unetr",
            "feature_size": 24,
            "num_heads": 2,
            "depth_swin_block": [2, 2, 4, 2],
            "use_checkpoint": True,
            "lr": 1e-4,
        }
    )
    assert (swin.feature_size, swin.num_heads, swin.depths, swin.remat) == (24, 2, (2, 2, 4, 2), True)
    assert swin.vit_norm == "layer" and swin.img_size == (96, 96, 96)
    with pytest.raises(ValueError, match="not supported"):
        mi_seg_args_to_config(["--model_name=unetr"])
    with pytest.raises(ValueError, match="not supported"):
        mi_seg_args_to_config(["--model_name=unet_vanilla", "--adn_ordering=ADN"])
    with pytest.raises(ValueError, match="one `norm_affine`"):
        mi_seg_args_to_config(["--model_name=unet_vanilla", "--encoder_norm_no_affine"])


def test_convert_cli_round_trip(tiny, tmp_path):
    import torch

    from cinjax import checkpointing, workdir
    from cinjax.convert import main
    from cinjax.models import build_model

    pt = tmp_path / "best.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tiny["sd"].items()}, "epoch": 1}, pt)
    out = tmp_path / "converted"
    main(["--checkpoint", str(pt), "--out", str(out), "--", *TINY_ARGS])
    # What eval / predict do with a converted directory.
    assert workdir.is_converted(out)
    model = build_model(workdir.read_converted_model_config(out))
    params, model_state = checkpointing.restore_inference_variables(out)[:2]
    assert model_state == {}
    _, ref = load_mi_seg(str(pt), TINY_ARGS)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), ref)
    info = json.loads((out / "conversion.json").read_text())
    assert info["report"]["ok"] and info["in_channels"] == 1
    assert (out / "model_config.py").exists()
    out = jax.jit(model.apply)({"params": params}, tiny["x"], tiny["modality"])
    np.testing.assert_allclose(out, tiny["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "section, n_params",
    [("swin_unetr_readme_fs36_h4", 35_162_156), ("swin_unetr_readme_fs48_h3", 62_218_298)],
)
def test_readme_swin_unetr_loads_strictly(section, n_params):
    argv, keys = keys_section(section)
    sd = random_state_dict(keys)
    model, params, report = load_mi_seg(sd, argv, return_report=True)
    assert report.ok
    assert len(report.loaded) == sum(1 for k in keys if not k.endswith("relative_position_index"))
    assert _n_params(params) == n_params
    assert model.vit_norm == "instance_cond" and model.encoder_norm == "instance_cond"
    assert model.decoder_norm == "instance"
    flat = traverse_util.flatten_dict(params)
    cin = [p for p in flat if p[-1] == "scale" and flat[p].ndim == 2]
    assert cin and all(flat[p].shape[0] == 2 for p in cin)


@pytest.mark.parametrize(
    "preset, section",
    [
        ("c_unet", "unet_vanilla_readme_best"),
        ("c_swin_unetr_fs36", "swin_unetr_readme_fs36_h4"),
        ("c_swin_unetr_fs48", "swin_unetr_readme_fs48_h3"),
    ],
)
def test_model_presets_equal_readme_commands(preset, section):
    argv, _ = keys_section(section)
    want = mi_seg_args_to_config(argv).to_dict()
    got = presets.get(preset).to_dict()
    for k, v in got.items():
        assert want[k] == v, f"{preset}.{k}: {v} != MI-Seg README {want[k]}"


def test_non_conditional_presets():
    assert presets.get("unet").encoder_norm == "instance"
    cfg = presets.get("swin_unetr_fs36")
    assert (cfg.encoder_norm, cfg.vit_norm, cfg.feature_size, cfg.num_heads) == ("instance", "layer", 36, 4)
    with pytest.raises(ValueError, match="Unknown model preset"):
        presets.get("c_unetr")


def test_load_monai_swin_unetr_strict():
    import torch
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    from cinjax.models.convert import load_monai_swin_unetr

    torch.manual_seed(0)
    net = MonaiSwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    # MONAI >= 1.5's "merging" uses all 8 sub-grids: it loads into cinjax's mergingv2 with re-ordering.
    model, params, report = load_monai_swin_unetr(
        {"state_dict": sd},
        out_channels=2,
        feature_size=12,
        num_heads=3,
        downsample="mergingv2",
        source_merging="merging_fixed",
        return_report=True,
    )
    assert report.ok, str(report)
    assert (model.vit_norm, model.encoder_norm, model.norm_affine) == ("layer", "instance", False)
    n_torch = sum(p.numel() for p in net.parameters())
    assert sum(np.size(p) for p in jax.tree.leaves(params)) == n_torch
    np.testing.assert_array_equal(params["out"]["conv"]["bias"], sd["out.conv.conv.bias"])
    with pytest.raises(CheckpointMismatchError):
        load_monai_swin_unetr(
            sd,
            out_channels=3,
            feature_size=12,
            num_heads=3,
            downsample="mergingv2",
            source_merging="merging_fixed",
        )


def test_pickled_objects_need_explicit_trust(tiny, tmp_path):
    """Lightning checkpoints carry hyper-parameters as Python objects: refused unless trusted."""
    import argparse

    import torch

    pt = tmp_path / "lightning.ckpt"
    sd = {f"model.{k}": torch.from_numpy(v.copy()) for k, v in tiny["sd"].items()}
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, pt)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_mi_seg(str(pt), TINY_ARGS)
    _, params = load_mi_seg(str(pt), TINY_ARGS, weights_only=False)
    np.testing.assert_array_equal(params["out"]["bias"], tiny["params"]["out"]["bias"])


def test_missing_torch_gives_install_hint(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"cinjax\[torch\]"):
        load_mi_seg(str(tmp_path / "best.pt"), TINY_ARGS)
