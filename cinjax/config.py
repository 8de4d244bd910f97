"""The config schema of ``python -m cinjax.main``: every section with its defaults, and the start-up
validation of a whole config.

Config files (``configs/*.py``) start from :func:`base_config` and override what differs. Defaults live
once: ``data`` in :func:`cinjax.data.config.default_data_config`, ``optim`` in
:func:`cinjax.optim.default_optim_config`, ``transforms`` in :class:`cinjax.data.transforms.TransformConfig`,
the rest here.
"""

from __future__ import annotations

import dataclasses
import hashlib

import ml_collections

from cinjax.data import pipeline
from cinjax.data.config import default_data_config
from cinjax.data.transforms import TransformConfig
from cinjax.inference import WindowSettings
from cinjax.optim import default_optim_config

MODES = ("train", "eval", "predict")
COMPUTE_DTYPES = ("float32", "bfloat16")
SECTIONS = ("model", "data", "transforms", "loader", "loss", "optim", "train", "eval", "predict")


def base_config() -> ml_collections.ConfigDict:
    """Every section ``cinjax.main`` reads; a config file overrides what differs."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train | eval | predict
    c.seed = 0

    c.model = ml_collections.ConfigDict()  # name + fields of the Flax module (cinjax.models.presets)
    c.data = default_data_config()
    # Random training transforms; the crop size comes from data.roi.
    defaults = TransformConfig()
    c.transforms = ml_collections.ConfigDict(
        {f.name: getattr(defaults, f.name) for f in dataclasses.fields(TransformConfig) if f.name != "roi"}
    )
    c.loader = ml_collections.ConfigDict(
        dict(
            global_batch_size=2,
            mode="interleave",  # interleave (modalities mixed in every device slice) | joint | single
            ratios=ml_collections.FieldReference(None, field_type=dict),  # e.g. {"CT": 1, "MR": 1}
            single_modality_name="CT",  # for mode=single
            num_workers=0,
            prefetch=2,
        )
    )
    # MI-Seg's criterion (MONAI 1.1.0 semantics); background included as in its tune path.
    c.loss = ml_collections.ConfigDict(
        dict(name="dice_focal", include_background=True, smooth_nr=0.0, smooth_dr=1e-6)
    )
    c.optim = default_optim_config()

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
            windows_per_call=0,  # 0: auto (1 on CPU, where bigger batches run slower; 4+ on accelerators)
            dtype="",  # inference compute dtype: "" (train.dtype) | float32 | bfloat16
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
            input_dir="",  # or a folder of NIfTI files, all of modality `predict.modality_name`
            modality_name="CT",
            checkpoint="best",
            after_train=False,
        )
    )
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail fast, before any data or compile work, on settings that cannot run; the message names the
    key and what to set instead."""
    for section in SECTIONS:
        if section not in config:
            raise ValueError(
                f"config has no `{section}` section; start from cinjax.config.base_config() "
                "(as configs/demo.py and configs/mmwhs.py do)."
            )
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}.")
    if config.train.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.train.dtype must be one of {COMPUTE_DTYPES}, got {config.train.dtype!r}.")
    if config.eval.dtype not in ("", *COMPUTE_DTYPES):
        raise ValueError(f"config.eval.dtype must be '' (train.dtype) or one of {COMPUTE_DTYPES}.")
    _validate_eval(config)
    _validate_data(config)
    _validate_schedule(config)
    if config.mode == "train":
        if config.train.num_steps < 1:
            raise ValueError(f"config.train.num_steps must be >= 1, got {config.train.num_steps}.")
        for k in ("log_every", "eval_every", "checkpoint_every"):
            if config.train[k] < 0:
                raise ValueError(f"config.train.{k} must be >= 0 (0 disables), got {config.train[k]}.")
        if config.loader.mode not in pipeline.MODES:
            raise ValueError(
                f"config.loader.mode must be one of {pipeline.MODES}, got {config.loader.mode!r}."
            )


def _validate_data(config: ml_collections.ConfigDict) -> None:
    data = config.data
    num_modalities = len(data.modalities)
    if config.model.get("num_modalities", num_modalities) != num_modalities:
        raise ValueError(
            f"config.model.num_modalities={config.model.num_modalities} but config.data.modalities has "
            f"{num_modalities} ({dict(data.modalities)}); they must agree."
        )
    if config.model.out_channels != data.num_classes:
        raise ValueError(
            f"config.model.out_channels={config.model.out_channels} != config.data.num_classes="
            f"{data.num_classes}."
        )
    if len(data.class_names) != data.num_classes:
        raise ValueError(
            f"config.data.class_names has {len(data.class_names)} names for data.num_classes="
            f"{data.num_classes} classes; name every class, background first."
        )
    roi = tuple(data.roi)
    if config.model.name == "swin_unetr" and any(r % 32 for r in roi):
        raise ValueError(f"Swin-UNETR needs every ROI size divisible by 32, got config.data.roi={roi}.")


def _validate_eval(config: ml_collections.ConfigDict) -> None:
    ev = config.eval
    if ev.windows_per_call < 0:
        raise ValueError(f"config.eval.windows_per_call must be >= 0 (0: auto), got {ev.windows_per_call}.")
    try:
        WindowSettings(
            roi=tuple(config.data.roi),
            overlap=ev.overlap,
            windows_per_call=max(ev.windows_per_call, 1),
            blend=ev.blend,
            sigma_scale=ev.sigma_scale,
        )
    except ValueError as e:
        raise ValueError(f"config.eval / config.data.roi: {e}") from e


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
    sched = config.optim.schedule
    if sched.name != "reduce_on_plateau":
        return
    want = {"loss": "min", "dice": "max"}.get(sched.plateau_metric)
    if want is None:
        raise ValueError(
            f"optim.schedule.plateau_metric must be 'loss' or 'dice', got {sched.plateau_metric!r}."
        )
    if sched.plateau_mode != want:
        raise ValueError(
            f"optim.schedule.plateau_metric={sched.plateau_metric!r} needs plateau_mode={want!r}."
        )
    if config.mode == "train" and not config.train.eval_every:
        raise ValueError(
            "optim.schedule.name='reduce_on_plateau' steps on validation results: set train.eval_every > 0."
        )


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short hash of the whole config (stored with every checkpoint)."""
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]
