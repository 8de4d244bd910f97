"""Every shipped config builds, validates and gives the paper's model sizes."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from cinjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = {"c_unet": 62_562_904, "c_swin_unetr_fs36": 35_162_156}


def load(path: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(
        f"cfg_{os.path.basename(path)[:-3]}", os.path.join(REPO, path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def _num_params(config) -> int:
    model = train.make_model(config)
    sample = train._sample_batch(config, 1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample["image"], sample["modality"])
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_demo_config_validates():
    c = load("configs/demo.py")
    train.validate_config(c)
    assert c.data.phantom.generate and c.predict.after_train


@pytest.mark.parametrize(
    "arg",
    ["c_unet", "unet,joint", "c_swin_unetr_fs36,bf16", "c_swin_unetr_fs48,ct", "swin_unetr_fs36,mr,remat"],
)
def test_mmwhs_variants_validate(arg):
    c = load("configs/mmwhs.py", arg)
    train.validate_config(c)
    assert tuple(c.data.roi) == (96, 96, 96) and c.optim.name == "adamw" and c.optim.lr == 1e-4
    if "joint" in arg:
        assert c.loader.mode == "joint"
    if ",ct" in arg:
        assert c.loader.mode == "single" and c.loader.single_modality == "CT"


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
        train.validate_config(c)
    c = load("configs/demo.py")
    c.train.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        train.validate_config(c)


def test_plateau_schedule_needs_periodic_evaluation():
    c = load("configs/demo.py")
    c.optim.schedule.name = "reduce_on_plateau"
    c.train.eval_every = 0
    with pytest.raises(ValueError, match="eval_every"):
        train.validate_config(c)
    c.train.eval_every = 10
    train.validate_config(c)
    c.optim.schedule.plateau_metric = "dice"
    with pytest.raises(ValueError, match="plateau_mode='max'"):
        train.validate_config(c)
