"""The paper's ablation on the phantom (``benchmarks/ablation.py`` runs every cell of it).

    python -m cinjax.main --config configs/ablation.py:MODEL[,VARIANT] --workdir DIR

MI-Seg's data arrangement at phantom scale: 10 CT *target* and 20 MR *assistant* training volumes of
different subjects (non-registered), 4 held-out CT and 4 held-out MR volumes (the ``test`` split,
scored once by the final evaluation: no checkpoint is selected on them). The model and everything
else is ``configs/demo.py``'s; every cell has the same budget (steps, crops per step, schedule).

* MODEL: ``c_unet`` (the demo's C-UNet), ``unet`` (same, plain instance norms), ``c_swin`` /
  ``swin`` (C-Swin-UNETR / Swin-UNETR, feature size 12, 3 heads, 32 x 32 x 64 crops: Swin-UNETR needs
  64 voxels on one axis).
* VARIANT: none (interleaved CT + MR in every batch), ``joint`` (one modality per batch, alternating),
  ``ct`` / ``mr`` (that modality only).
"""

import importlib.util
import os

from cinjax.models import presets

MODELS = ("c_unet", "unet", "c_swin", "swin")
VARIANTS = ("joint", "ct", "mr")


def _demo():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("cinjax_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = "c_unet"):
    model, *variants = [a.strip() for a in (arg or "c_unet").split(",") if a.strip()]
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r} in configs/ablation.py:{arg}; choose one of {MODELS}.")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or len(variants) > 1:
        raise ValueError(f"configs/ablation.py:{arg}: give at most one variant of {VARIANTS}.")

    c = _demo()
    if model == "unet":
        c.model.encoder_norm = "instance"
    elif model in ("c_swin", "swin"):
        swin = (presets.c_swin_unetr if model == "c_swin" else presets.swin_unetr)(12, 3)
        del swin["num_modalities"]  # from data.modalities
        c.model = swin
        # Swin-UNETR halves the grid five times and its norms need more than one voxel at the bottom:
        # 64 voxels on one axis (the UNets keep the demo's 32^3 crops).
        c.data.roi = (32, 32, 64)

    d = c.data
    d.root = os.path.expanduser("~/.cache/cinjax/phantom-ablation")
    d.phantom = dict(generate=True, seed=0, num_ct=14, num_mr=24, num_mr2=0, num_val=0, num_test=4)
    c.eval.split = "test"
    c.train.eval_every = 0  # the held-out volumes are scored once, at the end
    c.train.checkpoint_every = 100
    c.predict.after_train = False
    c.train.num_steps = 120
    c.optim.schedule.warmup_steps = 20

    if variants == ["joint"]:
        c.loader.mode = "joint"
    elif variants in (["ct"], ["mr"]):
        c.loader.mode = "single"
        c.loader.single_modality_name = variants[0].upper()
    return c
