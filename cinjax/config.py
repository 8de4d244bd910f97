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
import json
from typing import Any

import ml_collections

from cinjax.data import pipeline
from cinjax.data.config import default_data_config
from cinjax.data.datalist import SPLITS, check_modalities, label_code_map
from cinjax.data.io import DataError
from cinjax.data.preprocess import intensity_settings
from cinjax.data.transforms import TransformConfig
from cinjax.inference import WindowSettings
from cinjax.optim import default_optim_config

MODES = ("train", "eval", "predict")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the valid values."""


COMPUTE_DTYPES = ("float32", "bfloat16")
SECTIONS = (
    "model",
    "data",
    "transforms",
    "loader",
    "loss",
    "optim",
    "train",
    "eval",
    "predict",
    "finetune",
    "style",
)


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
            global_batch_size=0,  # 0: auto, the smallest multiple of the devices >= min_global_batch_size
            min_global_batch_size=4,
            mode="interleave",  # interleave (modalities mixed in every device slice) | joint | single
            # {"CT": 1, "MR": 1}, or from the command line "CT=1,MR=1"
            ratios=ml_collections.FieldReference(None, field_type=object),
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
            windows_per_call=0,  # 0: auto (2 per device on CPU, 4+ elsewhere); else a multiple of the devices
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
            checkpoint="best",  # best | latest (of the workdir) | another run or convert directory
            after_train=False,
            tta=False,  # mirroring test-time augmentation over the flips of tta_axes
            tta_axes=(0, 1, 2),  # spatial axes (D, H, W); all three: 8 flips
            probabilities=False,  # also write float16 class probabilities (predictions/probabilities/)
            postprocess=True,  # apply the run's largest-component decision (postprocessing.json)
        )
    )
    # Start from another run's weights (cinjax.finetune): fine-tuning, or a new modality's CIN rows.
    c.finetune = ml_collections.ConfigDict(
        dict(
            init_from="",  # a trained run / checkpoint / convert directory ("" : random init)
            checkpoint="best",  # best | latest of init_from
            new_modality_init="mean",  # a new modality's CIN rows: mean of the source rows | a source name
            trainable="all",  # all | new_modalities | new_modalities+head
        )
    )
    # Single-source generalization (cinjax.data.style): every crop also restyled, batches of (original,
    # restyled) pairs, Dice on both and a patch-wise InfoNCE between their encoder features.
    c.style = ml_collections.ConfigDict(
        dict(
            enabled=False,
            interventions=("gin", "bezier"),  # one drawn per crop; "generator" needs style.generator
            gin_layers=4,
            gin_channels=2,
            gin_kernel_sizes=(1, 3),
            gin_negative_slope=0.2,
            bezier_monotone_prob=0.5,
            generator="",  # "package.module:callable": a mask-conditioned generator (the diffusion route)
            generator_kwargs=ml_collections.ConfigDict(),
            info_nce_weight=0.0,  # 0: no InfoNCE term (interventions only)
            info_nce_temperature=0.07,
            info_nce_patches=128,  # patch locations sampled per crop
            info_nce_layer="",  # module path of the encoder level ("" : the model's default)
            info_nce_projection=0,  # width of a learned 2-layer MLP head on the features (0: none)
        )
    )
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail fast, before any data or compile work, on settings that cannot run; the message names the
    key and the valid values. Checks every enum, range, sign, shape and cross-section constraint that
    does not need the data (modality coverage needs the datalists: checked when the loader is built)."""
    for section in SECTIONS:
        if section not in config:
            raise ConfigError(
                f"config has no `{section}` section; start from cinjax.config.base_config() "
                "(as configs/demo.py and configs/mmwhs.py do)."
            )
    _one_of(config, "mode", MODES)
    _one_of(config, "train.dtype", COMPUTE_DTYPES)
    _one_of(config, "eval.dtype", ("", *COMPUTE_DTYPES))
    _validate_model(config)
    _validate_data(config)
    _validate_loader(config)
    _validate_optim(config)
    _validate_eval(config)
    _validate_schedule(config)
    from cinjax import finetune

    finetune.validate(config)
    _validate_style(config)
    _at_least(config, "train.num_steps", 1)
    for k in ("log_every", "eval_every", "checkpoint_every"):
        _at_least(config, f"train.{k}", 0, "0 disables")
    _at_least(config, "train.keep_checkpoints", 1)
    _at_least(config, "train.min_free_gb", 0)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _one_of(config: ml_collections.ConfigDict, key: str, choices: tuple) -> None:
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"config.{key} must be one of {choices}, got {value!r}.")


def _at_least(config: ml_collections.ConfigDict, key: str, low: float, note: str = "") -> None:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        extra = f" ({note})" if note else ""
        raise ConfigError(f"config.{key} must be a number >= {low}{extra}, got {value!r}.")


def _positive(config: ml_collections.ConfigDict, key: str) -> None:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"config.{key} must be > 0, got {value!r}.")


def _validate_model(config: ml_collections.ConfigDict) -> None:
    from cinjax.models import build_model

    model_cfg = config.model.to_dict()
    model_cfg.setdefault("num_modalities", len(config.data.modalities))
    try:
        build_model(model_cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from e


def _validate_style(config: ml_collections.ConfigDict) -> None:
    from cinjax.data import style

    st = config.style
    try:
        style.from_config(st)
    except ValueError as e:
        raise ConfigError(f"config.style: {e}") from e
    _at_least(config, "style.info_nce_weight", 0, "0: interventions only")
    _positive(config, "style.info_nce_temperature")
    _at_least(config, "style.info_nce_patches", 1)
    _at_least(config, "style.info_nce_projection", 0, "0: no projection head")
    fc = config.get("finetune")
    if st.info_nce_weight and st.info_nce_projection and fc is not None and fc.init_from:
        raise ConfigError(
            f"config.style.info_nce_projection={st.info_nce_projection} adds parameters a fine-tuned run "
            f"does not have ({fc.init_from}): set style.info_nce_projection=0 to fine-tune."
        )
    if st.info_nce_weight and not st.enabled:
        raise ConfigError(
            f"config.style.info_nce_weight={st.info_nce_weight} compares each crop with its restyled copy: "
            "set style.enabled=True (or the weight to 0)."
        )


def _validate_loader(config: ml_collections.ConfigDict) -> None:
    lc = config.loader
    _one_of(config, "loader.mode", pipeline.MODES)
    _at_least(config, "loader.global_batch_size", 0, "0: auto, a multiple of the devices")
    _at_least(config, "loader.min_global_batch_size", 1)
    _at_least(config, "loader.num_workers", 0)
    _at_least(config, "loader.prefetch", 0)
    if lc.global_batch_size:
        import jax

        n = jax.device_count()
        if lc.global_batch_size % n:
            lower, upper = (lc.global_batch_size // n) * n, -(-lc.global_batch_size // n) * n
            choices = " or ".join(str(v) for v in (lower, upper) if v)
            raise ConfigError(
                f"config.loader.global_batch_size={lc.global_batch_size} is not a multiple of the {n} "
                f"devices; use {choices}, or 0 (auto: the smallest multiple of {n} >= "
                "loader.min_global_batch_size)."
            )
    names = set(config.data.modalities)
    if lc.mode == "single" and lc.single_modality_name not in names:
        raise ConfigError(
            f"config.loader.single_modality_name={lc.single_modality_name!r} is not one of data.modalities "
            f"{sorted(names)}."
        )
    ratios = loader_ratios(config)
    if ratios:
        if set(ratios) != names or any(not (isinstance(v, (int, float)) and v > 0) for v in ratios.values()):
            raise ConfigError(
                f"config.loader.ratios={ratios} must give a positive number for each of {sorted(names)}."
            )
    try:
        TransformConfig.from_mapping(dict(config.transforms.to_dict(), roi=tuple(config.data.roi)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.transforms: {e}") from e


def loader_ratios(config: ml_collections.ConfigDict) -> dict[str, float] | None:
    """``loader.ratios`` as ``{modality name: weight}``: a mapping, or the command-line form
    ``"CT=1,MR=2"``; None when unset."""
    ratios = config.loader.get("ratios")
    if not ratios:
        return None
    if isinstance(ratios, str):
        out = {}
        for part in ratios.split(","):
            name, sep, value = part.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(
                    f"config.loader.ratios={ratios!r}: write it as NAME=WEIGHT pairs, e.g. 'CT=1,MR=1'."
                )
        return out
    return dict(ratios.to_dict() if hasattr(ratios, "to_dict") else ratios)


def _validate_optim(config: ml_collections.ConfigDict) -> None:
    from cinjax import losses
    from cinjax.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES

    _one_of(config, "optim.name", OPTIMIZER_NAMES)
    _one_of(config, "optim.schedule.name", SCHEDULE_NAMES)
    _positive(config, "optim.lr")
    _positive(config, "optim.eps")
    for key in ("weight_decay", "momentum", "clip_norm", "schedule.warmup_steps", "schedule.min_lr"):
        _at_least(config, f"optim.{key}", 0)
    for key in ("b1", "b2"):
        if not 0 <= config.optim[key] < 1:
            raise ConfigError(f"config.optim.{key} must be in [0, 1), got {config.optim[key]!r}.")
    _at_least(config, "optim.accumulate_steps", 1)
    _at_least(config, "optim.schedule.steps_per_epoch", 1)
    _positive(config, "optim.schedule.cycles")
    if config.optim.schedule.name == "cosine":
        _positive(config, "optim.schedule.t_max")
    kwargs = {k: v for k, v in config.loss.to_dict().items() if k != "name"}
    try:
        losses.get_loss(config.loss.name, return_parts=True, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.loss: {e}") from e


def _validate_data(config: ml_collections.ConfigDict) -> None:
    data = config.data
    _one_of(config, "data.layout", ("json", "mmwhs"))
    _one_of(config, "data.cache_fingerprint", ("stat", "content"))
    _at_least(config, "data.num_classes", 2)
    _at_least(config, "data.preprocess_workers", 0)
    _positive(config, "data.affine_atol")
    roi = tuple(data.roi)
    if len(roi) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ConfigError(f"config.data.roi must be 3 positive ints (D, H, W), got {roi}.")
    spacing = tuple(data.spacing)
    if spacing and (len(spacing) != 3 or any(not isinstance(v, (int, float)) or v <= 0 for v in spacing)):
        raise ConfigError(
            f"config.data.spacing must be 3 positive sizes in mm, or () to keep the grid; got {spacing}."
        )
    try:
        modalities = check_modalities(data.modalities)
        label_code_map(data.label_codes, int(data.num_classes))
        for name in modalities:
            intensity_settings(data, name)
    except DataError as e:
        raise ConfigError(str(e)) from e
    num_modalities = len(modalities)
    if config.model.get("num_modalities", num_modalities) != num_modalities:
        raise ConfigError(
            f"config.model.num_modalities={config.model.num_modalities} but config.data.modalities has "
            f"{num_modalities} ({dict(data.modalities)}); they must agree."
        )
    if config.model.out_channels != data.num_classes:
        raise ConfigError(
            f"config.model.out_channels={config.model.out_channels} != config.data.num_classes="
            f"{data.num_classes}."
        )
    if len(data.class_names) != data.num_classes:
        raise ConfigError(
            f"config.data.class_names has {len(data.class_names)} names for data.num_classes="
            f"{data.num_classes} classes; name every class, background first."
        )
    if config.model.name == "swin_unetr" and any(r % 32 for r in roi):
        raise ConfigError(f"Swin-UNETR needs every ROI size divisible by 32, got config.data.roi={roi}.")


def _validate_eval(config: ml_collections.ConfigDict) -> None:
    ev = config.eval
    _one_of(config, "eval.split", SPLITS)
    _one_of(config, "predict.split", SPLITS)
    _at_least(config, "eval.max_volumes", 0, "0: all")
    _positive(config, "eval.sigma_scale")
    if config.predict.modality_name not in config.data.modalities:
        raise ConfigError(
            f"config.predict.modality_name={config.predict.modality_name!r} is not one of data.modalities "
            f"{sorted(config.data.modalities)}."
        )
    if ev.windows_per_call < 0:
        raise ConfigError(f"config.eval.windows_per_call must be >= 0 (0: auto), got {ev.windows_per_call}.")
    if ev.windows_per_call:
        from cinjax.build import check_windows_per_call

        check_windows_per_call(ev.windows_per_call)  # a multiple of this host's devices
    if any(int(a) not in (0, 1, 2) for a in config.predict.tta_axes):
        raise ConfigError(
            f"config.predict.tta_axes must be spatial axes 0, 1, 2; got {config.predict.tta_axes}."
        )
    try:
        WindowSettings(
            roi=tuple(config.data.roi),
            overlap=ev.overlap,
            windows_per_call=max(ev.windows_per_call, 1),
            blend=ev.blend,
            sigma_scale=ev.sigma_scale,
        )
    except ValueError as e:
        raise ConfigError(f"config.eval / config.data.roi: {e}") from e


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
    sched = config.optim.schedule
    if sched.name != "reduce_on_plateau":
        return
    want = {"loss": "min", "dice": "max"}.get(sched.plateau_metric)
    if want is None:
        raise ConfigError(
            f"optim.schedule.plateau_metric must be 'loss' or 'dice', got {sched.plateau_metric!r}."
        )
    if sched.plateau_mode != want:
        raise ConfigError(
            f"optim.schedule.plateau_metric={sched.plateau_metric!r} needs plateau_mode={want!r}."
        )
    if config.mode == "train" and not config.train.eval_every:
        raise ConfigError(
            "optim.schedule.name='reduce_on_plateau' steps on validation results: set train.eval_every > 0."
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def config_changes(saved: dict[str, Any] | None, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """``{key: (saved value, current value)}`` for every leaf that differs (``mode`` aside) between the
    config a checkpoint was trained with (its JSON) and ``config``. ``{}`` when nothing was saved."""
    if not saved:
        return {}
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    keys = sorted((set(old) | set(new)) - {"mode"})
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short hash of the whole config (stored with every checkpoint)."""
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]
