"""MM-WHS 2017 CT + MR with MI-Seg's README-best setups.

    python -m cinjax.main --config configs/mmwhs.py:c_unet --workdir runs/c-unet \
        --config.data.root=/data/MM-WHS

The config string is ``MODEL[,VARIANT...]``:

* MODEL: ``c_unet`` (C-UNet, README best), ``unet`` (same, no CIN), ``c_swin_unetr_fs36`` /
  ``c_swin_unetr_fs48`` (C-Swin-UNETR), ``swin_unetr_fs36`` / ``swin_unetr_fs48`` (no CIN).
* VARIANT: ``joint`` (each batch one modality, alternating: the paper's joint-training baseline),
  ``ct`` / ``mr`` (single-modality baseline), ``bf16`` (bfloat16 compute), ``remat``, ``accum4`` (4 crops
  per step and 4 accumulated steps per update, MI-Seg's own arrangement, for devices short of memory).

Data as MI-Seg: ``CT_fold1.json`` + ``MR.json`` in ``data.root`` (unchanged MI-Seg datalists, which
point to the converted ``*_label_corrected`` files, hence ``label_codes="identity"``). For the raw
MM-WHS folders use ``--config.data.layout=mmwhs --config.data.label_codes=mmwhs``. 1 mm spacing,
per-volume min-max intensities, ROI 96^3, Dice + focal loss (MONAI 1.1.0 semantics, background
included as in MI-Seg's tune path), AdamW 1e-4 / weight decay 1e-5, warmup-cosine.

Batches: 16 crops per optimizer step (8 CT + 8 MR), the crops per update of MI-Seg's README tuning run
(batch 1 x 4 patches x 4 accumulated). With instance norms (no batch statistics) one batch of 16 is the
same maths as 4 x 4 accumulation and keeps an accelerator far busier; ``accum4`` restores the latter.
"""

from cinjax.config import base_config
from cinjax.data import mmwhs
from cinjax.models import presets

VARIANTS = ("joint", "ct", "mr", "bf16", "remat", "accum4")


def get_config(arg: str = "c_unet"):
    name, *variants = [a.strip() for a in (arg or "c_unet").split(",") if a.strip()]
    if name not in presets.PRESETS:
        raise ValueError(
            f"Unknown model {name!r} in configs/mmwhs.py:{arg}; choose one of {sorted(presets.PRESETS)}."
        )
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}; choose from {VARIANTS}.")

    c = base_config()  # MI-Seg's defaults: CT_fold1.json + MR.json, 1 mm, min-max, ROI 96^3, DiceFocal
    c.model = presets.get(name)
    c.data.union_name = mmwhs.UNION_NAME
    c.data.preprocess_workers = 4
    c.loader.min_global_batch_size = 16  # auto: 16 on 1, 2, 4, 8 or 16 devices, else the next multiple
    c.loader.num_workers = 4
    c.optim.schedule.warmup_steps = 325  # MI-Seg: 50 warmup epochs of 26 volumes x 4 patches / 16 crops

    t = c.train
    t.num_steps = 16_000  # updates of 16 crops ~ MI-Seg's 2,500 epochs of 104 crops
    t.log_every = 20
    t.eval_every = 500
    t.checkpoint_every = 250
    if "accum4" in variants:
        c.loader.min_global_batch_size = 4
        c.optim.accumulate_steps = 4
        for k in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
            t[k] *= 4

    if "joint" in variants:
        c.loader.mode = "joint"
    for single in ("ct", "mr"):
        if single in variants:
            c.loader.mode = "single"
            c.loader.single_modality_name = single.upper()
    if "bf16" in variants:
        c.train.dtype = "bfloat16"
    if "remat" in variants:
        c.model.remat = True
    return c
