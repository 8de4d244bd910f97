"""Demo: the embedded synthetic CT + MR phantom, a small C-UNet, minutes on a laptop CPU.

    python -m cinjax.main --config configs/demo.py --workdir /tmp/cinjax-demo

Generates the phantom (once) under ``data.root``, trains on interleaved CT/MR crops, evaluates per
modality on held-out phantoms (``eval/results.json``) and writes predictions for the test cases
(``predictions/*.nii.gz``, MM-WHS label codes, each input's own geometry).

Variants (``configs/demo.py:VARIANT``) with the phantom's third modality, black-blood MR (``MR2``:
inverted blood / myocardium contrast; 3 training volumes):

* ``mr2``: train one model on CT + MR + MR2, every batch a three-way mix (M = 3).
* ``add_mr2``: add MR2 to a trained CT + MR run by new rows of its CIN tables, fine-tuning only those
  rows on the MR2 volumes (``finetune.trainable``; CT and MR predictions stay bit-identical)::

      python -m cinjax.main --config configs/demo.py:add_mr2 --workdir /tmp/cinjax-demo-mr2 \
          --config.finetune.init_from=/tmp/cinjax-demo
"""

import os

from cinjax.config import base_config
from cinjax.data import mmwhs

VARIANTS = ("mr2", "add_mr2")


def get_config(arg: str = ""):
    variant = (arg or "").strip()
    if variant and variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/demo.py; choose one of {VARIANTS}.")
    c = base_config()
    c.model = dict(
        name="unet_vanilla",
        out_channels=mmwhs.NUM_CLASSES,
        channels=(8, 16, 32, 64),
        strides=(1, 2, 2, 2),
        num_res_units=1,
        encoder_norm="instance_cond",
        decoder_norm="instance",
    )
    d = c.data
    d.root = os.path.expanduser("~/.cache/cinjax/phantom")
    d.phantom = dict(generate=True, seed=0, num_ct=10, num_mr=10, num_mr2=0, num_val=2, num_test=2)
    d.json_lists = ("CT.json", "MR.json")
    d.label_codes = "mmwhs"
    d.union_name = mmwhs.UNION_NAME
    d.spacing = (2.5, 2.5, 2.5)
    d.roi = (32, 32, 32)

    # loader.global_batch_size=0 (default): 4 crops per step on 1, 2 or 4 devices, else a multiple of them.
    c.optim.lr = 3e-3
    c.optim.schedule.warmup_steps = 20

    t = c.train
    t.num_steps = 600
    t.eval_every = 200
    c.predict.after_train = True
    if variant:
        _with_mr2(c, adding=variant == "add_mr2")
    return c


def _with_mr2(c, adding: bool) -> None:
    """The phantom with its black-blood MR modality (its own root, so the CT + MR phantom is kept)."""
    d = c.data
    d.root = os.path.expanduser("~/.cache/cinjax/phantom-mr2")
    d.phantom.num_mr2 = 7  # 3 training, 2 validation, 2 test volumes
    d.json_lists = ("CT.json", "MR.json", "MR2.json")
    d.modalities = {"CT": 0, "MR": 1, "MR2": 2}
    c.loader.min_global_batch_size = 6  # auto: 6 crops per step on 1, 2, 3 or 6 devices: 2 of each
    if adding:
        c.loader.min_global_batch_size = 4
        c.loader.mode = "single"
        c.loader.single_modality_name = "MR2"
        c.finetune.trainable = "new_modalities"
        c.finetune.new_modality_init = "mean"
        c.train.num_steps = 200
        c.train.eval_every = 100
