"""MM-WHS 2017 CT + MR with MI-Seg's README-best setups.

    python -m cinjax.main --config configs/mmwhs.py:c_unet --workdir runs/c-unet \
        --config.data.root=/data/MM-WHS

The config string is ``MODEL[,VARIANT...]``:

* MODEL: ``c_unet`` (C-UNet, README best), ``unet`` (same, no CIN), ``c_swin_unetr_fs36`` /
  ``c_swin_unetr_fs48`` (C-Swin-UNETR), ``swin_unetr_fs36`` / ``swin_unetr_fs48`` (no CIN).
* VARIANT: ``joint`` (each batch one modality, alternating: the paper's joint-training baseline),
  ``ct`` / ``mr`` (single-modality baseline), ``bf16`` (bfloat16 compute), ``remat``.

Data as MI-Seg: ``CT_fold1.json`` + ``MR.json`` in ``data.root`` (unchanged MI-Seg datalists, which
point to the converted ``*_label_corrected`` files, hence ``label_codes="identity"``). For the raw
MM-WHS folders use ``--config.data.layout=mmwhs --config.data.label_codes=mmwhs``. 1 mm spacing,
per-volume min-max intensities, ROI 96^3, Dice + focal loss (MONAI 1.1.0 semantics, background
included as in MI-Seg's tune path), AdamW 1e-4 / weight decay 1e-5, warmup-cosine.

Batches: 4 crops per step (2 CT + 2 MR per device slice on one device), 4 accumulated micro-steps per
update = the 16 crops per optimizer step of MI-Seg's README tuning run (batch 1 x 4 patches x 4).
"""

import importlib.util
import os

from cinjax.config import base_config


def _presets():
    spec = importlib.util.spec_from_file_location(
        "cinjax_model_presets", os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = {
    "c_unet": lambda p: p.c_unet(),
    "unet": lambda p: p.unet(),
    "c_swin_unetr_fs36": lambda p: p.c_swin_unetr(36, 4),
    "c_swin_unetr_fs48": lambda p: p.c_swin_unetr(48, 3),
    "swin_unetr_fs36": lambda p: p.swin_unetr(36, 4),
    "swin_unetr_fs48": lambda p: p.swin_unetr(48, 3),
}
VARIANTS = ("joint", "ct", "mr", "bf16", "remat")


def get_config(arg: str = "c_unet"):
    name, *variants = [a.strip() for a in (arg or "c_unet").split(",") if a.strip()]
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} in configs/mmwhs.py:{arg}; choose one of {sorted(MODELS)}.")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}; choose from {VARIANTS}.")

    c = base_config()
    c.model = MODELS[name](_presets())

    d = c.data
    d.root = ""
    d.layout = "json"
    d.json_lists = ("CT_fold1.json", "MR.json")
    d.modalities = {"CT": 0, "MR": 1}
    d.label_codes = "identity"
    d.num_classes = 8
    d.spacing = (1.0, 1.0, 1.0)
    d.roi = (96, 96, 96)
    d.intensity.mode = "minmax"
    d.preprocess_workers = 4

    c.loader.global_batch_size = 4
    c.loader.num_workers = 4
    c.loss.name = "dice_focal"
    c.loss.include_background = True

    o = c.optim
    o.name = "adamw"
    o.lr = 1e-4
    o.weight_decay = 1e-5
    o.accumulate_steps = 4
    o.schedule.name = "warmup_cosine"
    o.schedule.warmup_steps = 325  # MI-Seg: 50 warmup epochs of 26 volumes x 4 patches / 16 crops
    o.schedule.cycles = 0.5

    t = c.train
    t.num_steps = 64_000  # micro-steps: 16,000 updates ~ MI-Seg's 2,500 epochs of 104 crops
    t.log_every = 50
    t.eval_every = 2_000
    t.checkpoint_every = 1_000

    c.eval.split = "validation"
    c.eval.overlap = 0.5
    c.eval.blend = "constant"
    c.eval.windows_per_call = 4

    if "joint" in variants:
        c.loader.mode = "joint"
    for single in ("ct", "mr"):
        if single in variants:
            c.loader.mode = "single"
            c.loader.single_modality = single.upper()
    if "bf16" in variants:
        c.train.dtype = "bfloat16"
    if "remat" in variants:
        c.model.remat = True
    return c
