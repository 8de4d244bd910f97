"""The training loop of ``python -m cinjax.main`` (``mode=train``).

:func:`setup` builds what the loop needs (:class:`TrainSetup`: mesh, data, model, optimizer, state
restored from the newest checkpoint, writers); :func:`train_and_evaluate` runs the loop: jitted sharded
steps, metrics one step late, periodic evaluation (best checkpoint, plateau schedule), checkpoints,
preemption; then the final evaluation and, if configured, predictions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from cinjax import (
    build,
    checkpointing,
    distributed,
    evaluate,
    finetune,
    optim,
    predict,
    preemption,
    runspec,
    steps,
    writers,
)
from cinjax.config import config_changes, config_hash
from cinjax.data import pipeline
from cinjax.workdir import Workdir


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


def every(n: int, step: int) -> bool:
    """Whether a period of ``n`` steps (0: never) ends at ``step``."""
    return n > 0 and step % n == 0


# ----------------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class TrainSetup:
    """Everything the loop needs, built by :func:`setup`."""

    config: ml_collections.ConfigDict
    run: Workdir
    mesh: Mesh
    inference_model: Any  # eval.dtype's model (the trained one unless eval.dtype differs)
    schedule: optim.Schedule
    train_step: Callable[[steps.TrainState, dict[str, jax.Array]], tuple[steps.TrainState, dict]]
    loader: pipeline.TrainLoader
    state: steps.TrainState
    start_step: int
    ckpt: checkpointing.Checkpointer
    writer: writers.MetricWriter
    plateau: optim.PlateauSchedule | None
    run_eval: Callable[..., dict[str, Any]]  # (state, step, final=False) -> results

    def checkpoint_meta(self) -> dict[str, Any]:
        """What each checkpoint records besides the state: the config it was trained with (compared on
        resume) and loop state (the plateau schedule)."""
        meta: dict[str, Any] = {"config": json.loads(self.config.to_json_best_effort())}
        if self.plateau is not None:
            meta["plateau"] = self.plateau.state_dict()
        return meta

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def setup(config: ml_collections.ConfigDict, run: Workdir) -> TrainSetup:
    """Data, model, optimizer, and the state: restored from the newest intact checkpoint of the
    workdir, or initialised. The caller has checked and locked ``run``."""
    tc = config.train
    mesh = distributed.make_mesh()
    writer = writers.MetricWriter(run.root)

    build.generate_phantom(config.data)
    splits = ("training", config.eval.split) if tc.eval_every or tc.final_eval else ("training",)
    prepared = build.prepare_data(config.data, splits)
    loader = build.make_train_loader(config, prepared, mesh)

    model = build.make_model(config)
    tx, schedule = build.make_optimizer(config, model)
    loss_fn = build.make_loss(config)
    init, abstract_state = build.make_init(config, model, tx, mesh)
    plateau = optim.PlateauSchedule.from_config(config)
    ckpt = checkpointing.Checkpointer(
        run.root,
        max_to_keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
        config_hash=config_hash(config),
    )
    try:
        start_step, state = _restore_or_init(config, run, ckpt, abstract_state, init, loader, plateau, writer)
    except BaseException:
        ckpt.close()  # orbax's background threads must stop before the process exits
        writer.close()
        raise
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info("Model %s: %d parameters; %s.", config.model.name, num_params, loader)

    window = build.window_settings(config)
    eval_mesh = build.inference_mesh(window.windows_per_call)
    inference_model = build.make_inference_model(config)
    predictor = build.WindowPredictor(inference_model, eval_mesh)
    eval_loss = loss_fn if config.eval.loss or (plateau is not None and plateau.needs_eval_loss) else None

    def run_eval(state: steps.TrainState, step: int, final: bool = False) -> dict[str, Any]:
        results = evaluate.evaluate(
            predictor.bind(state.params, state.model_state),
            evaluate.eval_records(config, prepared),
            dataset=prepared,
            window=window,
            mesh=eval_mesh,
            distances=config.eval.distances,
            panels_dir=run.panels_dir if config.eval.panels else None,
            step=step,
            loss_fn=eval_loss,
            postprocessing=final,
        )
        writer.write_scalars(step, evaluate.scalars(results, prepared.union_name), stream="eval")
        run.write_results(dict(results, split=config.eval.split, step=step, checkpoint="training state"))
        if final and distributed.is_main_process():
            decision = dict(results["postprocessing"], split=config.eval.split, step=step)
            runspec.write_postprocessing(run.root, decision)
            logging.info("Largest-component post-processing kept for %s.", decision["largest_component"])
        return results

    return TrainSetup(
        config=config,
        run=run,
        mesh=mesh,
        inference_model=inference_model,
        schedule=schedule,
        train_step=build.make_train_step(model, tx, loss_fn, mesh, build.info_nce(config)),
        loader=loader,
        state=state,
        start_step=start_step,
        ckpt=ckpt,
        writer=writer,
        plateau=plateau,
        run_eval=run_eval,
    )


def _restore_or_init(config, run, ckpt, abstract_state, init, loader, plateau, writer):
    """``(start_step, state)`` from the newest intact checkpoint, else a fresh state; the config in force
    is recorded (with the keys that changed since the checkpoint) and replayed log lines are dropped."""
    saved = ckpt.latest_meta()
    changed = config_changes(saved[1].get("config"), config) if saved else {}
    if changed:
        logging.warning(
            "Resuming %s with a changed config: %s",
            run.root,
            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
        )
    try:
        restored = ckpt.restore_latest(abstract_state, data_iter=loader)
    except checkpointing.CheckpointMismatchError as e:
        keys = f" Changed since the checkpoint: {', '.join(changed)}." if changed else ""
        raise checkpointing.CheckpointMismatchError(f"{e}{keys}") from e
    if restored is None:
        start_step, state = 0, _initial_state(config, init)
        writer.drop_after(0)  # a run killed before its first checkpoint leaves lines of a lost attempt
    else:
        start_step, state = restored.step, restored.state
        logging.info("Resumed from step %d.", start_step)
        writer.drop_after(start_step)
        if plateau is not None and "plateau" in restored.meta:
            plateau.load_state_dict(restored.meta["plateau"])
        if start_step >= config.train.num_steps:
            logging.warning(
                "The checkpoint is at step %d >= train.num_steps=%d: nothing left to train.",
                start_step,
                config.train.num_steps,
            )
    run.record_config(config, start_step, changed)
    if distributed.is_main_process():
        runspec.InferenceSpec.from_config(config).write(run.root)
    return start_step, state


def _initial_state(
    config: ml_collections.ConfigDict, init: Callable[[], steps.TrainState]
) -> steps.TrainState:
    """A fresh state: random, or with the weights of ``finetune.init_from`` (cinjax.finetune)."""
    state = init()
    if not config.finetune.init_from:
        return state
    source = finetune.load_source(config, state.params)
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), source.params, state.params)
    model_state = state.model_state
    if jax.tree.structure(source.model_state) == jax.tree.structure(model_state):
        model_state = jax.tree.map(
            lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
            source.model_state,
            model_state,
        )
    logging.info(
        "Initialised from %s (step %s); new modalities %s; trainable: %s.",
        source.directory,
        source.step,
        list(source.new_modalities) or "none",
        config.finetune.trainable,
    )
    return state.replace(params=params, model_state=model_state)


# ------------------------------------------------------------------------------------ step metrics


class DeferredMetrics:
    """Reads each step's metrics on the host one step late, and acts on them.

    Reading a step's metrics (``device_get``) blocks the host until that step has finished. Reading
    step k's only after step k+1 has been dispatched keeps the device busy while the host checks
    finiteness, logs and loads the next batch. :meth:`flush` reads the pending step at once: before an
    evaluation, a checkpoint or the end, so that nothing is evaluated, saved or reported before its
    step has been checked.
    """

    def __init__(self, s: TrainSetup, progress: writers.ProgressBar):
        self._s = s
        self._progress = progress
        self._pending: tuple[int, Any, float] | None = None
        self._cpu = jax.local_devices(backend="cpu")[0]

    def push(self, step: int, step_metrics: Any, wait_s: float) -> None:
        """Hand over the (device) metrics of a just-dispatched step; the previous step's are read now."""
        self.flush()
        self._pending = (step, step_metrics, wait_s)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._handle(*pending)

    def _lr(self, step: int) -> float:
        """The learning rate of ``step``, computed on the host CPU (no wait on the accelerator)."""
        update = (step - 1) // self._s.config.optim.accumulate_steps  # schedules count optimizer updates
        with jax.default_device(self._cpu):
            lr = float(self._s.schedule(update))
        return lr * (self._s.plateau.controller.multiplier if self._s.plateau is not None else 1.0)

    def _handle(self, step: int, step_metrics: Any, wait_s: float) -> None:
        m = jax.device_get(step_metrics)
        if not m["finite"]:
            latest = self._s.ckpt.latest_step()
            kept = (
                f"The last checkpoint (step {latest}, finite) is intact in {self._s.ckpt.directory}."
                if latest is not None
                else "No checkpoint was written yet."
            )
            raise NonFiniteLossError(
                f"Non-finite loss ({float(m['loss'])}), gradient norm ({float(m['grad_norm'])}) or update at "
                f"step {step}; the update was skipped and training stopped. {kept} Lower optim.lr, enable "
                "optim.clip_norm, check optim.eps > 0, or use train.dtype='float32'."
            )
        self._progress.update(step, loss=float(m["loss"]), data_wait_s=wait_s)
        tc = self._s.config.train
        if every(tc.log_every, step) or (tc.log_every and step == tc.num_steps):
            scalars = {k: float(v) for k, v in m.items() if k != "finite"}
            scalars["lr"] = self._lr(step)
            scalars["data_wait_s"] = wait_s
            self._s.writer.write_scalars(step, scalars, stream="train")


# ------------------------------------------------------------------------------------------- loop


def _evaluate_and_select(
    s: TrainSetup, state: steps.TrainState, step: int, final: bool = False
) -> tuple[steps.TrainState, dict]:
    """Evaluate, keep the best checkpoint, and step the plateau schedule (which may change the lr); the
    final evaluation also decides the post-processing."""
    results = s.run_eval(state, step, final)
    s.ckpt.save_best(step, {"params": state.params, "model_state": state.model_state}, results["mean_dice"])
    if s.plateau is not None:
        state = state.replace(opt_state=s.plateau.update(state.opt_state, results))
    return state, results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train with periodic evaluation; then the final evaluation (and predictions if configured).

    Returns the last evaluation's results, or ``{"stopped_at": step}`` after a preemption (SIGTERM /
    SIGINT): the checkpoint of that step is committed before this returns.
    """
    run = Workdir(workdir)
    run.check(int(config.train.min_free_gb * (1 << 30)))
    with run.lock():
        s = setup(config, run)
        try:
            return _loop(s)
        finally:
            s.close()


def _loop(s: TrainSetup) -> dict[str, Any]:
    config, tc = s.config, s.config.train
    progress = writers.ProgressBar(
        tc.num_steps, initial=s.start_step, crops_per_step=s.loader.global_batch_size
    )
    deferred = DeferredMetrics(s, progress)
    state, step, results = s.state, s.start_step, None
    try:
        with preemption.PreemptionFlag() as stop:
            while step < tc.num_steps:
                state, step_metrics = s.train_step(state, next(s.loader))
                step += 1
                deferred.push(step, step_metrics, s.loader.last_wait_s)
                if every(tc.eval_every, step) and step < tc.num_steps:
                    deferred.flush()
                    state, results = _evaluate_and_select(s, state, step)
                    progress.write(f"step {step}: validation mean Dice {results['mean_dice']:.4f}")
                stop_now = stop.should_stop(step)
                if every(tc.checkpoint_every, step) or stop_now or step == tc.num_steps:
                    deferred.flush()
                    s.ckpt.save(step, state, data_iter=s.loader, meta=s.checkpoint_meta())
                    s.writer.flush()  # TensorBoard and metrics.jsonl on disk as far as the checkpoint
                if stop_now:
                    s.ckpt.wait()  # committed before the process exits
                    by = stop.signal_name or "another process"
                    progress.write(f"Stop requested ({by}): saved a checkpoint at step {step}; exiting.")
                    return {"stopped_at": step}
            deferred.flush()
            # The final checkpoint is on disk before anything else can take time (or be interrupted).
            s.ckpt.wait()
            progress.close()
            if tc.final_eval:
                state, results = _evaluate_and_select(s, state, step, final=True)
                logging.info(
                    "Final validation mean Dice %.4f %s; best %.4f at step %s.",
                    results["mean_dice"],
                    {m: round(r["mean_dice"], 4) for m, r in results["modalities"].items()},
                    s.ckpt.best_dice or float("nan"),
                    s.ckpt.best_step(),
                )
            if stop.should_stop(step):
                progress.write(f"Stop requested ({stop.signal_name}) after the final checkpoint; exiting.")
                return {"stopped_at": step}
            if config.predict.after_train:
                pc = config.predict
                predictor = predict.Predictor(
                    runspec.read(s.run.root),
                    [(s.inference_model, state.params, state.model_state, "training state", step)],
                    tta_axes=tuple(pc.tta_axes) if pc.tta else None,
                    windows_per_call=config.eval.windows_per_call,
                    postprocess=pc.postprocess,
                )
                predict.predict(config, s.run.root, predictor=predictor)
    finally:
        progress.close()
    return results or {}
