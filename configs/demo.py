"""Demo: the embedded synthetic CT + MR phantom, a small C-UNet, minutes on a laptop CPU.

    python -m cinjax.main --config configs/demo.py --workdir /tmp/cinjax-demo

Generates the phantom (once) under ``data.root``, trains on interleaved CT/MR crops, evaluates per
modality on held-out phantoms (``eval/results.json``) and writes predictions for the test cases
(``predictions/*.nii.gz``, MM-WHS label codes, each input's own geometry).
"""

import os

from cinjax.config import base_config
from cinjax.data import mmwhs


def get_config():
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
    d.phantom = dict(generate=True, seed=0, num_ct=10, num_mr=10, num_val=2, num_test=2)
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
    return c
