"""Every shipped config builds, validates and gives the paper's model sizes."""

import os

import jax
import numpy as np
import pytest
from _cli import REPO
from _cli import load_config as load

from cinjax import build
from cinjax.config import validate

PARAMS = {"c_unet": 62_562_904, "c_swin_unetr_fs36": 35_162_156}


def _num_params(config) -> int:
    model = build.make_model(config)
    sample = build.sample_batch(config, 1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample["image"], sample["modality"])
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_demo_config_validates():
    c = load("configs/demo.py")
    validate(c)
    assert c.data.phantom.generate and c.predict.after_train


@pytest.mark.parametrize(
    "arg",
    [
        "c_unet",
        "unet,joint",
        "c_swin_unetr_fs36,bf16",
        "c_swin_unetr_fs48,ct",
        "swin_unetr_fs36,mr,remat,accum4",
    ],
)
def test_mmwhs_variants_validate(arg):
    c = load("configs/mmwhs.py", arg)
    validate(c)
    assert tuple(c.data.roi) == (96, 96, 96) and c.optim.name == "adamw" and c.optim.lr == 1e-4
    if "joint" in arg:
        assert c.loader.mode == "joint"
    if ",ct" in arg:
        assert c.loader.mode == "single" and c.loader.single_modality_name == "CT"


@pytest.mark.parametrize("arg", sorted(PARAMS))
def test_mmwhs_models_have_mi_seg_sizes(arg):
    assert _num_params(load("configs/mmwhs.py", arg)) == PARAMS[arg]


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown variant"):
        load("configs/mmwhs.py", "c_unet,fast")


def test_config_errors_are_caught_at_start_up():
    c = load("configs/demo.py")
    c.model.num_modalities = 3
    with pytest.raises(ValueError, match="num_modalities=3"):
        validate(c)
    c = load("configs/demo.py")
    c.train.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        validate(c)


def test_plateau_schedule_needs_periodic_evaluation():
    c = load("configs/demo.py")
    c.optim.schedule.name = "reduce_on_plateau"
    c.train.eval_every = 0
    with pytest.raises(ValueError, match="eval_every"):
        validate(c)
    c.train.eval_every = 10
    validate(c)
    c.optim.schedule.plateau_metric = "dice"
    with pytest.raises(ValueError, match="plateau_mode='max'"):
        validate(c)


def test_class_names_must_name_every_class():
    c = load("configs/demo.py")
    c.data.class_names = ("background", "LV")
    with pytest.raises(ValueError, match="class_names has 2 names"):
        validate(c)


def test_union_metric_is_named_by_the_dataset():
    """MM-WHS configs report the whole-heart Dice; the generic default names no organ."""
    assert load("configs/demo.py").data.union_name == "whole_heart"
    assert load("configs/mmwhs.py", "c_unet").data.union_name == "whole_heart"
    from cinjax.config import base_config

    assert base_config().data.union_name == "whole_foreground"


@pytest.mark.parametrize("arg, crops, accumulate", [("c_unet", 16, 1), ("c_unet,accum4", 4, 4)])
def test_mmwhs_updates_see_16_crops(arg, crops, accumulate):
    """One batch of 16 (default) or 4 x 4 accumulated (accum4), 16,000 updates; on a device count that
    does not divide the batch, the next multiple of the devices."""
    c = load("configs/mmwhs.py", arg)
    validate(c)
    n = jax.device_count()
    assert build.global_batch_size(c) == n * -(-crops // n) and c.optim.accumulate_steps == accumulate
    assert c.train.num_steps // c.optim.accumulate_steps == 16_000


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("windows_per_call", -1, "windows_per_call"),
        ("blend", "gausian", "blend"),
        ("overlap", 1.0, "overlap"),
        ("dtype", "float16", "eval.dtype"),
        ("max_volumes", -1, "max_volumes"),
        ("sigma_scale", 0.0, "sigma_scale"),
    ],
)
def test_bad_eval_settings_fail_at_start_up(key, value, match):
    c = load("configs/demo.py")
    c.eval[key] = value
    with pytest.raises(ValueError, match=match):
        validate(c)


def test_windows_per_call_auto_splits_over_every_device():
    """0 (auto): two windows per local device on CPU (8 fake devices here); a set value that does not
    split over the devices is refused at start-up, not run on one device."""
    c = load("configs/demo.py")
    assert c.eval.windows_per_call == 0
    n = jax.local_device_count()
    assert build.window_settings(c).windows_per_call == (
        2 * n if jax.default_backend() == "cpu" else n * -(-4 // n)
    )
    c.eval.windows_per_call = n + 1
    with pytest.raises(ValueError, match=f"multiple of {n}"):
        validate(c)
    c.eval.windows_per_call = 2 * n
    validate(c)


def test_loader_ratios_from_the_command_line(tmp_path):
    """`--config.loader.ratios=CT=1,MR=2` (config_flags cannot override a dict field) is read as
    {name: weight}; a malformed value is refused naming the form."""
    import subprocess
    import sys

    script = tmp_path / "parse.py"
    script.write_text(
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from cinjax.config import loader_ratios, validate\n"
        "c = config_flags.DEFINE_config_file('config', None, '', lock_config=False)\n"
        "flags.FLAGS(sys.argv)\n"
        "validate(c.value)\n"
        "print(loader_ratios(c.value))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, str(script), "--config", os.path.join(REPO, "configs/demo.py")]
        + ["--config.loader.ratios=CT=1,MR=2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{'CT': 1.0, 'MR': 2.0}"
    c = load("configs/demo.py")
    c.loader.ratios = "CT:1"
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        validate(c)


def test_disk_full_is_explained_in_one_line():
    """ENOSPC anywhere in the cause chain of a failure (e.g. inside orbax's async save) is reported as
    a full disk with what to do."""
    import errno

    from cinjax.main import explain

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as e:
        message = explain(e)
    assert message is not None and "disk full" in message and "resume" in message
    assert explain(RuntimeError("unexpected")) is None


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("optim.lr", -0.003, "optim.lr"),
        ("optim.eps", 0.0, "optim.eps"),
        ("optim.accumulate_steps", 0, "optim.accumulate_steps"),
        ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
        ("train.num_steps", 0, "train.num_steps"),
        ("data.roi", (32, 32), "data.roi"),
        ("data.spacing", (2.5, 2.5), "data.spacing"),
        ("loader.mode", "interleaved", "interleave"),
        ("train.dtype", "bf16", "train.dtype"),
        ("model.name", "unet_vanila", "unet_vanilla"),
        ("data.intensity.mode", "minmaxx", "minmax"),
        ("data.label_codes", "foo", "label_codes"),
        ("eval.split", "val", "eval.split"),
    ],
)
def test_bad_values_are_refused_before_any_work_naming_the_key(key, value, match):
    """The reliability cases B14 / B17 / B19 / B20 / B22 / E4: each bad value is a ConfigError naming it."""
    from cinjax.config import ConfigError

    c = load("configs/demo.py")
    *section, leaf = key.split(".")
    node = c
    for part in section:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


@pytest.mark.parametrize("arg", ["", "mr2", "add_mr2"])
def test_demo_variants_validate(arg):
    c = load("configs/demo.py", arg)
    if arg == "add_mr2":  # freezing needs the trained run
        with pytest.raises(ValueError, match="needs finetune.init_from"):
            validate(c)
        c.finetune.trainable = "all"
    validate(c)
    assert len(c.data.modalities) == (3 if arg else 2) == len(c.data.json_lists)


@pytest.mark.parametrize("arg", ["c_unet", "unet,ct", "c_swin", "swin,joint", "unet,mr"])
def test_ablation_configs_validate(arg):
    validate(load("configs/ablation.py", arg))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("style.interventions", ("gin", "warp"), "unknown"),
        ("style.info_nce_weight", 0.5, "set style.enabled=True"),
        ("style.info_nce_temperature", 0.0, "info_nce_temperature"),
        ("style.info_nce_projection", -1, "info_nce_projection must be a number >= 0"),
        ("finetune.trainable", "rows", "finetune.trainable must be one of"),
        ("finetune.init_from", "/nonexistent/run", "does not exist"),
    ],
)
def test_style_and_finetune_settings_fail_at_start_up(key, value, match):
    c = load("configs/demo.py")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        validate(c)


def test_projection_head_cannot_be_fine_tuned(tmp_path):
    c = load("configs/demo.py")
    c.style.enabled, c.style.info_nce_weight, c.style.info_nce_projection = True, 0.1, 8
    c.finetune.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="set style.info_nce_projection=0 to fine-tune"):
        validate(c)
