"""The training loop, evaluation and prediction behind ``python -m cinjax.main``.

Sections of :func:`train_and_evaluate`: set-up (mesh, workdir checks, config) → data (cached
preprocessing, interleaving grain loader) → model, optimizer, state → restore → loop (jitted sharded
step, metrics, progress, periodic evaluation, checkpoints, preemption) → final evaluation and
predictions. ``eval`` and ``predict`` modes reuse the same pieces on a saved checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cinjax import checkpointing, distributed, inference, losses, metrics, optim, steps, writers
from cinjax.data import cache, preprocess
from cinjax.data import pipeline as data_pipeline
from cinjax.data import transforms as data_transforms
from cinjax.data.io import write_nifti
from cinjax.models import build_model

MODES = ("train", "eval", "predict")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fail fast, before any data or compile work, on settings that cannot run."""
    for section in ("model", "data", "loader", "loss", "optim", "train", "eval", "predict"):
        if section not in config:
            raise ValueError(
                f"config has no `{section}` section; start from configs/demo.py or configs/mmwhs.py."
            )
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}.")
    if config.train.dtype not in DTYPES:
        raise ValueError(f"config.train.dtype must be one of {tuple(DTYPES)}, got {config.train.dtype!r}.")
    num_modalities = len(config.data.modalities)
    if config.model.get("num_modalities", num_modalities) != num_modalities:
        raise ValueError(
            f"config.model.num_modalities={config.model.num_modalities} but config.data.modalities has "
            f"{num_modalities} ({dict(config.data.modalities)}); they must agree."
        )
    if config.model.out_channels != config.data.num_classes:
        raise ValueError(
            f"config.model.out_channels={config.model.out_channels} != config.data.num_classes="
            f"{config.data.num_classes}."
        )
    roi = tuple(config.data.roi)
    if config.model.name == "swin_unetr" and any(r % 32 for r in roi):
        raise ValueError(f"Swin-UNETR needs every ROI size divisible by 32, got config.data.roi={roi}.")
    sched = config.optim.schedule
    if sched.name == "reduce_on_plateau":
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
                "optim.schedule.name='reduce_on_plateau' steps on validation results: set "
                "train.eval_every > 0."
            )
    if config.mode == "train":
        if config.train.num_steps < 1:
            raise ValueError(f"config.train.num_steps must be >= 1, got {config.train.num_steps}.")
        for k in ("log_every", "eval_every", "checkpoint_every"):
            if config.train[k] < 0:
                raise ValueError(f"config.train.{k} must be >= 0 (0 disables), got {config.train[k]}.")


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    checkpointing.check_workdir_writable(workdir, int(config.train.min_free_gb * (1 << 30)))
    _save_config(config, workdir)


def prepare_data(data_config: Any, splits: Sequence[str]) -> preprocess.PreparedData:
    """Preprocess (or reuse) the cached volumes; process 0 first, so hosts sharing a cache directory
    never write the same entry at once, the others then find it cached."""
    first = jax.process_index() == 0
    if not first:
        distributed.sync("prepare_data")
    prepared = preprocess.prepare(data_config, splits=tuple(splits), progress=first)
    if first and jax.process_count() > 1:
        distributed.sync("prepare_data")
    return prepared


def _maybe_generate_phantom(config: ml_collections.ConfigDict) -> None:
    """Demo configs carry ``data.phantom``: process 0 writes the synthetic dataset first (idempotent)."""
    if jax.process_index() == 0:
        from cinjax.data import phantom

        info = phantom.generate_from_config(config.data)
        if info and info.get("generated"):
            logging.info("Generated the phantom dataset in %s (%.1f s).", info["root"], info["seconds"])
    distributed.sync("phantom")


# ------------------------------------------------------------------------------------------ model


def make_model(config: ml_collections.ConfigDict):
    model_cfg = config.model.to_dict()
    model_cfg.setdefault("num_modalities", len(config.data.modalities))
    model_cfg["dtype"] = DTYPES[config.train.dtype] if config.train.dtype != "float32" else None
    return build_model(model_cfg)


def make_loss(config: ml_collections.ConfigDict):
    kwargs = {k: v for k, v in config.loss.to_dict().items() if k != "name"}
    return losses.get_loss(config.loss.name, return_parts=True, **kwargs)


def _sample_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    roi = tuple(config.data.roi)
    return {
        "image": np.zeros((batch_size, *roi, 1), np.float32),
        "modality": np.zeros((batch_size,), np.int32),
    }


def _inference_state(state: steps.TrainState) -> dict[str, Any]:
    """What the best checkpoint keeps: the variables inference needs."""
    return {"params": state.params, "model_state": state.model_state}


def _abstract_with_sharding(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ------------------------------------------------------------------------------------- evaluation


def _spacing_of(record: cache.VolumeRecord) -> tuple[float, ...]:
    return tuple(float(s) for s in cache.read_meta(record.path)["spacing"])


def make_predict_fn(
    model, params: Any, model_state: Mapping[str, Any] | None = None, mesh: Mesh | None = None
):
    """A jitted ``(windows, modality) -> fp32 logits`` on this process's devices.

    The variables are copied from (replicated) training arrays to one local device, or replicated
    over ``mesh`` (local devices) when windows are split across devices.
    """
    target = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.local_devices()[0]

    def local_copy(x):
        if isinstance(x, jax.Array):
            x = x.addressable_data(0)
        return jax.device_put(x, target)

    variables = jax.tree.map(local_copy, {"params": params, **(model_state or {})})
    jitted = jax.jit(functools.partial(steps.predict_logits, model=model))
    return lambda windows, modality: jitted(variables, windows, modality)


def local_mesh(windows_per_call: int) -> Mesh | None:
    """A mesh over this process's devices when the window batch splits evenly over them."""
    devices = jax.local_devices()
    if len(devices) == 1 or windows_per_call % len(devices):
        return None
    return Mesh(np.array(devices), ("data",))


def evaluate(
    predict_fn,
    records: Sequence[cache.VolumeRecord],
    *,
    config: ml_collections.ConfigDict,
    modality_names: Mapping[int, str],
    class_names: Sequence[str],
    panels_dir: str | None = None,
    step: int = 0,
    loss_fn=None,
) -> dict[str, Any]:
    """Sliding-window inference on every record, metrics per volume, summary (results.json shape).

    With ``loss_fn`` the training loss of each whole-volume prediction is reported too (``loss``:
    the mean over volumes; what MI-Seg's reduce-on-plateau monitors).

    Every process evaluates every volume on its local devices (only process 0 writes), so no
    cross-host gather of Python objects is needed.
    """
    ev = config.eval
    roi = tuple(config.data.roi)
    mesh = local_mesh(ev.windows_per_call)
    volumes, panels = [], {}
    for rec in tqdm.tqdm(records, desc="evaluate", unit="vol", disable=jax.process_index() != 0, leave=False):
        if not rec.has_label:
            raise ValueError(f"{rec.key}: evaluation needs labelled volumes (split {ev.split!r}).")
        image, label = cache.read_volume(rec)
        pred = inference.predict_volume(
            predict_fn,
            image[..., None],
            rec.modality,
            roi,
            overlap=ev.overlap,
            windows_per_call=ev.windows_per_call,
            blend=ev.blend,
            sigma_scale=ev.sigma_scale,
            stitch_on_host=ev.stitch_on_host,
            num_classes=config.data.num_classes,
            mesh=mesh,
        )
        name = modality_names[rec.modality]
        volume = metrics.evaluate_volume(
            pred.labels,
            label,
            spacing=_spacing_of(rec),
            num_classes=config.data.num_classes,
            class_names=tuple(class_names)[1:],
            key=rec.key,
            modality=name,
            distances=ev.distances,
        )
        if loss_fn is not None:
            volume["loss"] = float(_volume_loss(loss_fn, jnp.asarray(pred.logits), jnp.asarray(label)))
        volumes.append(volume)
        panels.setdefault(name, (image, label, pred.labels))
    summary = metrics.summarize(volumes, tuple(class_names)[1:])
    if loss_fn is not None and volumes:
        summary["loss"] = float(np.mean([v["loss"] for v in volumes]))
    if panels_dir and jax.process_index() == 0:
        writers.save_modality_panels(panels_dir, step, panels, num_classes=config.data.num_classes)
    return summary


@functools.partial(jax.jit, static_argnums=0)
def _volume_loss(loss_fn, logits: jax.Array, label: jax.Array) -> jax.Array:
    out = loss_fn(logits[None], label[None].astype(jnp.int32))
    return out[0] if isinstance(out, tuple) else out


def _write_results(workdir: str, results: Mapping[str, Any], name: str = "results.json") -> str:
    path = os.path.join(workdir, "eval", name)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(metrics.json_safe(results), f, indent=1)
    return path


def _eval_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    out = {"mean_dice": results["mean_dice"]}
    if "loss" in results:
        out["loss"] = results["loss"]
    for m, r in results["modalities"].items():
        out[f"{m}/mean_dice"] = r["mean_dice"]
        for k in ("mean_hd95_mm", "mean_assd_mm", "whole_heart_dice"):
            if k in r:
                out[f"{m}/{k}"] = r[k]
    return out


# ------------------------------------------------------------------------------------------ train


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train with periodic evaluation; final evaluation (and predictions if configured)."""
    tc = config.train
    # --- Set-up ------------------------------------------------------------------------------
    _prepare_workdir(config, workdir)
    mesh = distributed.make_mesh()
    repl, data_sharding = distributed.replicated(mesh), distributed.data_sharding(mesh)
    writer = writers.MetricWriter(workdir)

    # --- Data --------------------------------------------------------------------------------
    _maybe_generate_phantom(config)
    splits = ("training", config.eval.split) if tc.eval_every or tc.final_eval else ("training",)
    prepared = prepare_data(config, tuple(dict.fromkeys(splits)))
    train_records = {n: r for n, r in prepared.records["training"].items() if r}
    if config.loader.mode == "single":
        name = config.loader.single_modality
        if name not in train_records:
            raise ValueError(
                f"config.loader.single_modality={name!r} has no training volumes; "
                f"available: {sorted(train_records)}."
            )
        train_records = {name: train_records[name]}
    loader = data_pipeline.make_train_loader(
        train_records,
        global_batch_size=config.loader.global_batch_size,
        mesh=mesh,
        seed=config.seed,
        mode=config.loader.mode,
        ratios=config.loader.ratios.to_dict() if config.loader.get("ratios") else None,
        transform_cfg=data_transforms.TransformConfig.from_mapping(
            dict(config.transforms.to_dict(), roi=tuple(config.data.roi))
        ),
        num_workers=config.loader.num_workers,
        prefetch=config.loader.prefetch,
    )

    # --- Model, optimizer, state -------------------------------------------------------------
    model = make_model(config)
    accumulate = int(config.optim.get("accumulate_steps", 1))
    tx, schedule = optim.make_optimizer(config, max(1, tc.num_steps // accumulate))
    loss_fn = make_loss(config)
    init = jax.jit(
        functools.partial(steps.create_train_state, model, tx, seed=config.seed), out_shardings=repl
    )
    sample = _sample_batch(config, 1)
    abstract_state = _abstract_with_sharding(jax.eval_shape(init, sample), repl)

    # --- Restore -----------------------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(
        workdir,
        max_to_keep=tc.keep_checkpoints,
        save_every_steps=None,
        async_save=tc.async_checkpoint,
        config_hash=config_hash(config),
    )
    restored = ckpt.restore_latest(abstract_state, data_iter=loader)
    if restored is None:
        start_step, state = 0, init(sample)
    else:
        start_step, state = restored
        logging.info("Resumed from step %d.", start_step)
        writer.drop_after(start_step)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info("Model %s: %d parameters; %s.", config.model.name, num_params, loader)

    train_step = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn),
        in_shardings=(repl, data_sharding),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    modality_names = prepared.modality_names
    plateau = None
    if config.optim.schedule.name == "reduce_on_plateau":
        plateau = optim.PlateauController.from_config(config)
        saved = ckpt.metadata() if restored is not None else None
        if saved and "plateau" in saved.get("metrics", {}):
            plateau.load_state_dict(saved["metrics"]["plateau"])
    plateau_on_loss = plateau is not None and config.optim.schedule.plateau_metric == "loss"
    eval_loss_fn = loss_fn if plateau_on_loss or config.eval.loss else None

    def run_eval(step: int) -> dict[str, Any]:
        predict_fn = make_predict_fn(
            model, state.params, state.model_state, local_mesh(config.eval.windows_per_call)
        )
        results = evaluate(
            predict_fn,
            prepared.all_records(config.eval.split)[: config.eval.max_volumes or None],
            config=config,
            modality_names=modality_names,
            class_names=prepared.class_names,
            panels_dir=workdir if config.eval.panels else None,
            step=step,
            loss_fn=eval_loss_fn,
        )
        writer.write_scalars(step, _eval_scalars(results), split="eval")
        _write_results(workdir, dict(results, step=step))
        return results

    # --- Loop --------------------------------------------------------------------------------
    progress = writers.ProgressBar(
        tc.num_steps, initial=start_step, crops_per_step=config.loader.global_batch_size
    )
    pending: tuple[int, Any, float] | None = None
    results = None
    step = start_step

    def finish_step(done_step: int, step_metrics: Any, wait_s: float) -> None:
        m = jax.device_get(step_metrics)
        if not m["finite"]:
            raise NonFiniteLossError(
                f"Non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) at step "
                f"{done_step}; the update was skipped and training stopped. The last good checkpoint "
                f"(step {ckpt.latest_step()}) is intact in {ckpt.directory}. Lower optim.lr, enable "
                "optim.clip_norm or use train.dtype='float32'."
            )
        progress.update(done_step, loss=float(m["loss"]), data_wait_s=wait_s)
        if tc.log_every and (done_step % tc.log_every == 0 or done_step == tc.num_steps):
            scalars = {k: float(v) for k, v in m.items() if k != "finite"}
            update = (done_step - 1) // accumulate  # schedules count optimizer updates
            scalars["lr"] = float(schedule(update)) * optim.get_lr_multiplier(state.opt_state)
            scalars["data_wait_s"] = wait_s
            writer.write_scalars(done_step, scalars, split="train")

    try:
        with checkpointing.PreemptionFlag() as stop:
            while step < tc.num_steps:
                batch = next(loader)
                state, step_metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    finish_step(*pending)
                pending = (step, step_metrics, loader.last_wait_s)
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.num_steps:
                    finish_step(*pending)
                    pending = None
                    results = run_eval(step)
                    ckpt.save_best(step, _inference_state(state), results["mean_dice"])
                    if plateau is not None:
                        value = results["loss"] if plateau_on_loss else results["mean_dice"]
                        multiplier = plateau.step(value)
                        state = state.replace(opt_state=optim.set_lr_multiplier(state.opt_state, multiplier))
                    progress.write(f"step {step}: validation mean Dice {results['mean_dice']:.4f}")
                stop_now = stop.should_stop(step)
                due = tc.checkpoint_every and step % tc.checkpoint_every == 0
                if due or stop_now or step == tc.num_steps:
                    if pending is not None:  # log (and check finiteness of) the step being saved
                        finish_step(*pending)
                        pending = None
                    ckpt.save(
                        step,
                        state,
                        data_iter=loader,
                        metrics={"plateau": plateau.state_dict()} if plateau is not None else None,
                    )
                if stop_now:
                    progress.write(f"Stop requested: saved a checkpoint at step {step}; exiting.")
                    return {"stopped_at": step}
            if pending is not None:
                finish_step(*pending)
                pending = None
        progress.close()
        # --- Final evaluation and predictions ------------------------------------------------
        if tc.final_eval:
            results = run_eval(step)
            ckpt.save_best(step, _inference_state(state), results["mean_dice"])
            logging.info(
                "Final validation mean Dice %.4f: %s",
                results["mean_dice"],
                {m: round(r["mean_dice"], 4) for m, r in results["modalities"].items()},
            )
        if config.predict.after_train:
            predict(config, workdir, model=model, params=state.params, model_state=state.model_state)
    finally:
        progress.close()
        ckpt.close()
        writer.close()
    return results or {}


# ---------------------------------------------------------------------------- eval / predict modes


def _converted_model_config(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    """A ``python -m cinjax.convert`` directory carries its model config: use it, checked against the data."""
    with open(os.path.join(path, "config.json")) as f:
        model = json.load(f)
    if model.get("out_channels") != config.data.num_classes:
        raise ValueError(
            f"{path}: the converted model predicts {model.get('out_channels')} classes but "
            f"config.data.num_classes={config.data.num_classes}."
        )
    if model.get("num_modalities", 2) != len(config.data.modalities):
        raise ValueError(
            f"{path}: the converted model has {model.get('num_modalities')} modalities but "
            f"config.data.modalities={dict(config.data.modalities)}."
        )
    logging.info("Using the model config of the converted checkpoint %s: %s", path, model)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = model
    return config


def _restore_for_inference(config: ml_collections.ConfigDict, workdir: str, which: str):
    path = which if which not in ("best", "latest") else workdir
    if os.path.isfile(os.path.join(path, "conversion.json")):
        config = _converted_model_config(config, path)
    model = make_model(config)
    prefer = which if which in ("best", "latest") else "best"
    params, model_state = checkpointing.restore_inference_variables(path, prefer=prefer)
    return model, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, model_state)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``mode=eval``: evaluate a saved checkpoint on ``config.eval.split``."""
    os.makedirs(workdir, exist_ok=True)
    _save_config(config, workdir)
    _maybe_generate_phantom(config)
    prepared = prepare_data(config, (config.eval.split,))
    model, params, model_state = _restore_for_inference(config, workdir, config.eval.checkpoint)
    results = evaluate(
        make_predict_fn(model, params, model_state, local_mesh(config.eval.windows_per_call)),
        prepared.all_records(config.eval.split)[: config.eval.max_volumes or None],
        config=config,
        modality_names=prepared.modality_names,
        class_names=prepared.class_names,
        panels_dir=workdir if config.eval.panels else None,
    )
    _write_results(workdir, results)
    with writers.MetricWriter(workdir) as writer:
        writer.write_scalars(0, _eval_scalars(results), split="eval")
    return results


def _folder_datalist(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A datalist for ``predict.input_dir`` (every NIfTI in it, one modality) written in the workdir."""
    pc = config.predict
    folder = os.path.abspath(os.path.expanduser(pc.input_dir))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"config.predict.input_dir={pc.input_dir!r} is not a directory.")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".nii", ".nii.gz")))
    if not names:
        raise FileNotFoundError(f"No .nii/.nii.gz files in config.predict.input_dir={folder!r}.")
    if pc.modality not in config.data.modalities:
        raise ValueError(
            f"config.predict.modality={pc.modality!r} is not one of the configured modalities "
            f"{sorted(config.data.modalities)}."
        )
    path = os.path.join(workdir, "predict_datalist.json")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(
                {
                    "modality": pc.modality,
                    "training": [],
                    "validation": [],
                    "test": [{"image": os.path.join(folder, n)} for n in names],
                },
                f,
                indent=1,
            )
    distributed.sync("predict_datalist")
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.layout, data.root, data.json_lists, data.data_dirs = "json", "/", (path,), ()
    return data


def _output_name(source: str) -> str:
    base = os.path.basename(source)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    out = base.replace("image", "label") if "image" in base else base + "_label"
    return out + ".nii.gz"


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model=None,
    params: Any = None,
    model_state: Mapping[str, Any] | None = None,
) -> list[str]:
    """``mode=predict``: segment ``predict.split`` (or every NIfTI in ``predict.input_dir``) and write
    ``<workdir>/predictions/*.nii.gz`` in each input's original geometry, with the dataset's label codes."""
    pc = config.predict
    os.makedirs(workdir, exist_ok=True)
    if model is None:
        _save_config(config, workdir)
        _maybe_generate_phantom(config)
        model, params, model_state = _restore_for_inference(config, workdir, pc.checkpoint)
    data = _folder_datalist(config, workdir) if pc.input_dir else config.data
    split = "test" if pc.input_dir else pc.split
    prepared = prepare_data(data, (split,))
    class_to_code = np.zeros(max(prepared.num_classes, 1), np.int64)
    for code, cls in prepared.label_codes.items():
        class_to_code[cls] = code
    if class_to_code.max() > np.iinfo(np.uint16).max:
        raise ValueError("Label codes do not fit a uint16 NIfTI.")
    mesh = local_mesh(config.eval.windows_per_call)
    predict_fn = make_predict_fn(model, params, model_state, mesh)
    out_dir = os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    ev = config.eval
    written = []
    records = prepared.all_records(split)
    if not records:
        raise ValueError(f"No volumes to predict in split {split!r}.")
    for rec in tqdm.tqdm(records, desc="predict", unit="vol", disable=jax.process_index() != 0, leave=False):
        meta = cache.read_meta(rec.path)
        image, _ = cache.read_volume(rec)
        pred = inference.predict_volume(
            predict_fn,
            image[..., None],
            rec.modality,
            tuple(config.data.roi),
            overlap=ev.overlap,
            windows_per_call=ev.windows_per_call,
            blend=ev.blend,
            sigma_scale=ev.sigma_scale,
            stitch_on_host=ev.stitch_on_host,
            num_classes=config.data.num_classes,
            mesh=mesh,
        )
        labels = preprocess.invert_to_original(pred.labels, meta)
        path = os.path.join(out_dir, _output_name(meta["source"]["image"]))
        if jax.process_index() == 0:
            write_nifti(path, class_to_code[labels].astype(np.uint16), preprocess.original_affine(meta))
        written.append(path)
    logging.info("Wrote %d predictions to %s.", len(written), out_dir)
    return written


# ------------------------------------------------------------------------------------------ entry


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Dispatch on ``config.mode`` (the body of ``python -m cinjax.main``)."""
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if config.mode == "train":
        return train_and_evaluate(config, workdir)
    if config.mode == "eval":
        return evaluate_checkpoint(config, workdir)
    return predict(config, workdir)
