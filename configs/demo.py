"""Demo: the embedded synthetic CT + MR phantom, a small C-UNet, minutes on a laptop CPU.

    python -m cinjax.main --config configs/demo.py --workdir /tmp/cinjax-demo

Generates the phantom (once) under ``data.root``, trains on interleaved CT/MR crops, evaluates per
modality on held-out phantoms (``eval/results.json``) and writes predictions for the test cases
(``predictions/*.nii.gz``, MM-WHS label codes, each input's own geometry).
"""

import os

from cinjax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.model = dict(
        name="unet_vanilla",
        out_channels=8,
        channels=(8, 16, 32, 64),
        strides=(1, 2, 2, 2),
        num_res_units=1,
        encoder_norm="instance_cond",
        decoder_norm="instance",
        conv_impl="auto",
    )
    d = c.data
    d.root = os.path.expanduser("~/.cache/cinjax/phantom")
    d.phantom = dict(generate=True, seed=0, num_ct=10, num_mr=10, num_val=2, num_test=2)
    d.layout = "json"
    d.json_lists = ("CT.json", "MR.json")
    d.label_codes = "mmwhs"
    d.spacing = (2.5, 2.5, 2.5)
    d.roi = (32, 32, 32)
    d.cache_dir = os.path.expanduser("~/.cache/cinjax/volumes")

    c.loader.global_batch_size = 4
    c.optim.lr = 3e-3
    c.optim.weight_decay = 1e-5
    c.optim.schedule.name = "warmup_cosine"
    c.optim.schedule.warmup_steps = 20

    t = c.train
    t.num_steps = 600
    t.log_every = 10
    t.eval_every = 200
    t.checkpoint_every = 100
    c.eval.split = "validation"
    c.eval.windows_per_call = 4
    c.predict.after_train = True
    c.predict.split = "test"
    return c
