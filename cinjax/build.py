"""Config → the pieces every mode needs: model, loss, optimizer, data, jitted steps, predict function.

Training, evaluation and prediction all build from here, so ``mode=eval`` / ``mode=predict`` rebuild
exactly the model ``mode=train`` trained.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cinjax import distributed, finetune, losses, optim, steps
from cinjax.config import loader_ratios
from cinjax.data import pipeline, preprocess
from cinjax.data import transforms as data_transforms
from cinjax.inference import PredictFn, WindowSettings
from cinjax.models import build_model

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------ model


def make_model(config: ml_collections.ConfigDict, dtype: str | None = None) -> nn.Module:
    """The Flax module of ``config.model`` (``num_modalities`` from the data); compute dtype ``dtype``,
    by default ``train.dtype``."""
    model_cfg = config.model.to_dict()
    model_cfg.setdefault("num_modalities", len(config.data.modalities))
    model_cfg["dtype"] = COMPUTE_DTYPES[dtype or config.train.dtype]
    return build_model(model_cfg)


def make_inference_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The model evaluation and prediction run: compute dtype ``eval.dtype`` (default ``train.dtype``)."""
    return make_model(config, config.eval.dtype or None)


def model_from_spec(spec: Any, dtype: str | None = None) -> nn.Module:
    """The Flax module of a run's :class:`cinjax.runspec.InferenceSpec`; compute dtype ``dtype``, by
    default the run's inference dtype."""
    return build_model(dict(spec.model, dtype=COMPUTE_DTYPES[dtype or spec.dtype]))


def make_loss(config: ml_collections.ConfigDict) -> losses.LossFn:
    """The training loss of ``config.loss``, returning ``(loss, {part: value})``."""
    kwargs = {k: v for k, v in config.loss.to_dict().items() if k != "name"}
    return losses.get_loss(config.loss.name, return_parts=True, **kwargs)


def make_optimizer(
    config: ml_collections.ConfigDict, model: nn.Module | None = None
) -> tuple[optax.GradientTransformation, optim.Schedule]:
    """``(tx, schedule)``; schedules count optimizer updates (``num_steps / accumulate_steps``). With
    ``finetune.trainable`` other than ``all`` only the unfrozen parameters of ``model`` are updated."""
    updates = max(1, config.train.num_steps // config.optim.accumulate_steps)
    tx, schedule = optim.make_optimizer(config, updates)
    fc = config.get("finetune")
    if fc is not None and fc.trainable != "all":
        if model is None:
            raise ValueError("make_optimizer needs the model to freeze parameters (finetune.trainable).")
        tx = finetune.masked(tx, finetune.trainable_mask(config, param_shapes(config, model)))
    return tx, schedule


def param_shapes(config: ml_collections.ConfigDict, model: nn.Module) -> Any:
    """The model's params as ``ShapeDtypeStruct`` s (no compute)."""
    sample = sample_batch(config, 1)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), sample["image"], sample["modality"], train=False)
    )
    return variables["params"]


def sample_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """Zeros shaped like a model input batch (for init and shape inference)."""
    return {
        "image": np.zeros((batch_size, *config.data.roi, 1), np.float32),
        "modality": np.zeros((batch_size,), np.int32),
    }


# ------------------------------------------------------------------------------------------- data


def generate_phantom(data: ml_collections.ConfigDict) -> None:
    """Demo configs carry ``data.phantom``: process 0 writes the synthetic dataset first (idempotent)."""
    if distributed.is_main_process():
        from cinjax.data import phantom

        info = phantom.generate_from_config(data)
        if info and info.get("generated"):
            logging.info("Generated the phantom dataset in %s (%.1f s).", info["root"], info["seconds"])
    distributed.sync("phantom")


def prepare_data(data: ml_collections.ConfigDict, splits: Sequence[str]) -> preprocess.PreparedData:
    """Preprocess (or reuse) the cached volumes of ``splits``.

    Process 0 goes first, so hosts sharing a cache directory never write the same entry at once; the
    others then find it cached.
    """
    first = distributed.is_main_process()
    if not first:
        distributed.sync("prepare_data")
    prepared = preprocess.prepare(data, splits=tuple(dict.fromkeys(splits)), progress=first)
    if first and jax.process_count() > 1:
        distributed.sync("prepare_data")
    return prepared


def global_batch_size(config: ml_collections.ConfigDict) -> int:
    """``loader.global_batch_size``, or for 0 (auto) the smallest multiple of the devices that is at least
    ``loader.min_global_batch_size``: a valid batch on any device count."""
    n = jax.device_count()
    return config.loader.global_batch_size or n * -(-config.loader.min_global_batch_size // n)


def make_train_loader(
    config: ml_collections.ConfigDict, prepared: preprocess.PreparedData, mesh: Mesh
) -> pipeline.TrainLoader:
    """The interleaving grain loader over the prepared training volumes of ``config.loader.mode``.

    Interleaved and joint training need training volumes of every configured modality: a modality
    without any is an error (it would otherwise be dropped from the mix silently).
    """
    records = {name: recs for name, recs in prepared.records["training"].items() if recs}
    empty = [name for name in config.data.modalities if name not in records]
    if not records:
        raise ValueError(
            f"The training split has no volumes (data.layout={config.data.layout!r}, data.json_lists="
            f"{tuple(config.data.json_lists)}, root {config.data.root!r}): list training volumes."
        )
    if empty and config.loader.mode != "single":
        raise ValueError(
            f"Modality {', '.join(empty)} of data.modalities has no training volumes; loader.mode="
            f"{config.loader.mode!r} mixes every modality. Add {', '.join(empty)} volumes to the training "
            "split, remove it from data.modalities, or train one modality with loader.mode='single'."
        )
    if config.loader.mode == "single":
        name = config.loader.single_modality_name
        if name not in records:
            raise ValueError(
                f"config.loader.single_modality_name={name!r} has no training volumes; "
                f"available: {sorted(records)}."
            )
        records = {name: records[name]}
    transform_cfg = data_transforms.TransformConfig.from_mapping(
        dict(config.transforms.to_dict(), roi=tuple(config.data.roi))
    )
    sample_fn = None
    if config.style.enabled:
        from cinjax.data import style

        sample_fn = style.PairedSample(style.Restyler(style.from_config(config.style)))
    return pipeline.make_train_loader(
        records,
        global_batch_size=global_batch_size(config),
        mesh=mesh,
        seed=config.seed,
        mode=config.loader.mode,
        ratios=loader_ratios(config),
        transform_cfg=transform_cfg,
        sample_fn=sample_fn,
        num_workers=config.loader.num_workers,
        prefetch=config.loader.prefetch,
    )


# ------------------------------------------------------------------------------------- train step


def default_info_nce_layer(model_cfg: ml_collections.ConfigDict) -> str:
    """The encoder level the InfoNCE term compares when ``style.info_nce_layer`` is "": the second
    down block of a UNet (the first when it has only one), Swin-UNETR's ``encoder3``; both at 1/4 of the
    crop's resolution with the default strides."""
    if model_cfg.name == "unet_vanilla":
        return f"down_{max(0, min(1, len(model_cfg.channels) - 2))}_0"
    if model_cfg.name == "swin_unetr":
        return "encoder3"
    return ""


def info_nce(config: ml_collections.ConfigDict) -> steps.PairInfoNCE | None:
    """The InfoNCE term of ``config.style`` (None when its weight is 0)."""
    st = config.style
    if not st.enabled or not st.info_nce_weight:
        return None
    layer = st.info_nce_layer or default_info_nce_layer(config.model)
    if not layer:
        from cinjax.config import ConfigError

        raise ConfigError(
            f"config.style.info_nce_layer: no default for model {config.model.name!r}; name the module "
            "path of an encoder level."
        )
    return steps.PairInfoNCE(
        layer,
        float(st.info_nce_weight),
        float(st.info_nce_temperature),
        int(st.info_nce_patches),
        int(st.info_nce_projection),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: losses.LossFn,
    mesh: Mesh,
    pair_loss: steps.PairInfoNCE | None = None,
) -> Any:
    """The jitted, sharded train step ``(state, batch) -> (state, metrics)``; the state is donated.
    ``pair_loss``: the InfoNCE term of style training (:func:`info_nce`)."""
    repl = distributed.replicated(mesh)
    return jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn, info_nce=pair_loss),
        in_shardings=(repl, distributed.data_sharding(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def make_init(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Any, steps.TrainState]:
    """``(init, abstract_state)``: ``init()`` builds the replicated train state; ``abstract_state`` holds
    its shapes and shardings (what a checkpoint is restored onto)."""
    repl = distributed.replicated(mesh)
    sample = sample_batch(config, 1)
    jitted = jax.jit(
        functools.partial(steps.create_train_state, model, tx, seed=config.seed, info_nce=info_nce(config)),
        out_shardings=repl,
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), jax.eval_shape(jitted, sample)
    )
    return functools.partial(jitted, sample), abstract


# -------------------------------------------------------------------------------------- inference


def auto_windows_per_call() -> int:
    """Windows per model call when ``eval.windows_per_call=0``: two per local device on CPU, else at
    least 4 and a multiple of the local devices; each call splits evenly over every local device. On the
    2-core benchmark VM, 2 per call beat 1 in 8 of 9 runs of the 18-window C-UNet volume (median 9 %),
    and 4 gained nothing more (``benchmarks/RESULTS.md``)."""
    n = jax.local_device_count()
    return 2 * n if jax.default_backend() == "cpu" else n * -(-4 // n)


def check_windows_per_call(windows_per_call: int) -> int:
    """``windows_per_call`` (0: :func:`auto_windows_per_call`), checked to split over the local devices."""
    if not windows_per_call:
        return auto_windows_per_call()
    n = jax.local_device_count()
    if windows_per_call % n:
        from cinjax.config import ConfigError

        raise ConfigError(
            f"eval.windows_per_call={windows_per_call} does not split over this host's {n} devices: use a "
            f"multiple of {n} (e.g. {n * -(-windows_per_call // n)}) or 0 (auto)."
        )
    return windows_per_call


def window_settings(config: ml_collections.ConfigDict) -> WindowSettings:
    """The sliding-window settings of ``config.eval`` (shared by evaluation and prediction)."""
    ev = config.eval
    return WindowSettings(
        roi=tuple(config.data.roi),
        overlap=ev.overlap,
        windows_per_call=check_windows_per_call(ev.windows_per_call),
        blend=ev.blend,
        sigma_scale=ev.sigma_scale,
        stitch_on_host=ev.stitch_on_host,
    )


def inference_mesh(windows_per_call: int) -> Mesh | None:
    """This process's devices as a mesh (None with one device); each batch of windows is split over all
    of them (:func:`check_windows_per_call` has made it divisible)."""
    if jax.local_device_count() == 1:
        return None
    check_windows_per_call(windows_per_call)
    return distributed.local_mesh()


ALL_FLIPS = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def tta_flips(axes: Sequence[int] | None) -> tuple[tuple[int, ...], ...]:
    """Mirroring TTA over every subset of the spatial ``axes`` (None or empty: no TTA; (0, 1, 2): all 8
    combinations)."""
    if not axes:
        return ()
    axes = tuple(sorted({int(a) for a in axes}))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"TTA axes must be spatial axes 0, 1, 2 (D, H, W), got {axes}.")
    return tuple(f for f in ALL_FLIPS if set(f) <= set(axes))


class WindowPredictor:
    """A model's jitted ``(windows, modality) -> fp32 logits`` on this process's devices.

    Jitted once per run (:meth:`bind` attaches the current variables without recompiling), so each
    periodic evaluation reuses the compiled program. ``flips``: mirroring TTA inside the same program
    (:func:`cinjax.steps.predict_logits`).
    """

    def __init__(self, model: nn.Module, mesh: Mesh | None = None, flips: tuple[tuple[int, ...], ...] = ()):
        self.mesh = mesh
        self._target = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.local_devices()[0]
        self.jitted = jax.jit(functools.partial(steps.predict_logits, model=model, flips=flips))

    def _local_copy(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array):  # replicated training arrays: this process's copy
            x = x.addressable_data(0)
        return jax.device_put(x, self._target)

    def bind(self, params: Any, model_state: Any) -> PredictFn:
        """The predict function with these variables copied to (or replicated over) local devices."""
        variables = jax.tree.map(self._local_copy, {"params": params, **(model_state or {})})
        return functools.partial(self.jitted, variables)
