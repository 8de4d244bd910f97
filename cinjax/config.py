"""The config schema of `python -m cinjax.main`: every section with its defaults (MI-Seg's where it has one).

Config files (`configs/*.py`) start from :func:`base_config` and override what differs."""

from __future__ import annotations

import ml_collections

from cinjax.data.config import default_data_config
from cinjax.optim import default_optim_config


def base_config() -> ml_collections.ConfigDict:
    """Every section ``cinjax.main`` reads; a config file overrides what differs."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train | eval | predict
    c.seed = 0

    c.model = ml_collections.ConfigDict()  # name + fields of the Flax module (see configs/models.py)
    c.data = default_data_config()

    # Random training transforms (cinjax.data.transforms.TransformConfig; roi comes from data.roi).
    c.transforms = ml_collections.ConfigDict(
        dict(
            pos=1.0,
            neg=1.0,
            flip_prob=0.2,
            rot90_prob=0.2,
            rot90_max_k=3,
            scale_intensity_prob=0.1,
            scale_intensity_factor=0.1,
            shift_intensity_prob=0.1,
            shift_intensity_offset=0.1,
        )
    )
    c.loader = ml_collections.ConfigDict(
        dict(
            global_batch_size=2,
            mode="interleave",  # interleave (modalities mixed in every device slice) | joint | single
            ratios=ml_collections.FieldReference(None, field_type=dict),  # e.g. {"CT": 1, "MR": 1}
            single_modality="CT",  # for mode=single
            num_workers=0,
            prefetch=2,
        )
    )
    # MI-Seg's criterion (MONAI 1.1.0 semantics); background included as in its tune path.
    c.loss = ml_collections.ConfigDict(
        dict(
            name="dice_focal",
            include_background=True,
            smooth_nr=0.0,
            smooth_dr=1e-6,
        )
    )
    c.optim = default_optim_config()
    c.optim.schedule.name = "warmup_cosine"
    c.optim.schedule.plateau_metric = "loss"  # reduce_on_plateau monitors: loss (min) | dice (max)

    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            log_every=10,
            eval_every=250,  # 0: no periodic evaluation
            final_eval=True,
            checkpoint_every=100,  # 0: only at the end / on SIGTERM
            keep_checkpoints=2,
            async_checkpoint=True,
            dtype="float32",  # compute dtype: float32 | bfloat16 (norms, losses, params stay fp32)
            min_free_gb=1.0,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            split="validation",
            checkpoint="best",  # eval/predict modes: best | latest | a checkpoint or convert directory
            overlap=0.5,
            blend="constant",  # constant (MI-Seg) | gaussian
            sigma_scale=0.125,
            windows_per_call=4,
            stitch_on_host=False,
            distances=True,  # HD95 / ASSD (mm)
            loss=False,  # also the training loss of each whole volume (on when a plateau schedule uses it)
            panels=True,
            max_volumes=0,  # 0: all
        )
    )
    c.predict = ml_collections.ConfigDict(
        dict(
            split="test",
            input_dir="",  # or a folder of NIfTI files, all of modality `predict.modality`
            modality="CT",
            checkpoint="best",
            after_train=False,
        )
    )
    return c
