"""Optimizers and learning-rate schedules with PyTorch / MONAI semantics (docs/mi-seg-spec.md §5.2).

``make_optimizer(config, total_steps)`` builds an ``optax`` transformation from ``config.optim``
(keys below; :func:`default_optim_config` has MI-Seg's defaults). The chain is

    [MultiSteps(k)] ( [clip_by_global_norm] → optimizer core → × schedule(step) → × lr_multiplier )

* ``adamw``: torch AdamW (decoupled weight decay multiplied by the lr), ``adam``: torch Adam with L2
  weight decay added to the gradient, ``sgd``: torch SGD with (Nesterov) momentum and L2 weight decay.
  Weight decay applies to every parameter, norms and biases included, as in MI-Seg (one param group).
* Schedules are functions of the optimizer step (one step = one parameter update; with gradient
  accumulation the k micro-batches count once). MI-Seg steps its schedulers once per *epoch*: to
  reproduce that, express ``warmup_steps``/``total_steps``/``t_max`` in epochs and set
  ``schedule.steps_per_epoch``; the lr then stays constant within an epoch,
  ``lr(step) = f(step // steps_per_epoch)``. With the default ``steps_per_epoch = 1`` they advance
  every optimizer step.
* ``reduce_on_plateau`` cannot live inside a jitted step (it reacts to validation values). The
  transformation carries a float32 ``lr_multiplier`` leaf in its state (initially 1); the host runs a
  :class:`PlateauController` (torch ``ReduceLROnPlateau`` semantics) on each evaluation value and writes
  the new multiplier with :func:`set_lr_multiplier`. The multiplier is part of the optimizer state, so it
  is checkpointed with it; the controller's counters are saved with ``controller.state_dict()``.
* Gradient accumulation (``accumulate_steps = k > 1``): ``optax.MultiSteps`` averages k consecutive
  gradients and updates every k-th call (params unchanged in between), equal to one step on the
  k-times larger batch when each micro-batch loss is a mean over equal-sized batches (MI-Seg divides
  each loss by k and sums). Unlike MI-Seg there is no forced update at an epoch end.
* Clipping (``clip_norm > 0``) acts on the (accumulated) gradient before weight decay and momentum,
  as ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()``.

``config.optim`` keys (ml_collections ConfigDict):

  name            "adamw" | "adam" | "sgd"
  lr              base learning rate (MI-Seg --lr, 1e-4)
  weight_decay    MI-Seg --reg_weight (1e-5)
  b1, b2, eps     Adam(W) betas and epsilon (torch defaults 0.9, 0.999, 1e-8)
  momentum        SGD momentum (MI-Seg --momentum 0.99); nesterov (bool, True)
  clip_norm       global-norm clipping threshold; 0 or None disables (MI-Seg does not clip)
  accumulate_steps  micro-batches per update (MI-Seg --iters_to_accumulate, 1)
  schedule.name   "warmup_cosine" | "cosine" | "constant" | "reduce_on_plateau"
  schedule.warmup_steps       warmup_cosine warmup length (MI-Seg --warmup_epochs, 50)
  schedule.total_steps        warmup_cosine t_total; None → make_optimizer's total_steps
  schedule.cycles             warmup_cosine cycles (0.5)
  schedule.warmup_multiplier  warmup_cosine start fraction (0.0: the lr at step 0 is 0, as in MI-Seg)
  schedule.t_max              cosine period T_max (MI-Seg --t_max, 200)
  schedule.min_lr             cosine eta_min and plateau min_lr (0.0)
  schedule.steps_per_epoch    schedule advances once per this many optimizer steps (1)
  schedule.plateau_mode       "min" | "max" (torch default "min"; MI-Seg monitors the val loss)
  schedule.plateau_metric     name of the evaluation value the trainer feeds the controller ("loss")
  schedule.plateau_factor     0.1
  schedule.plateau_patience   MI-Seg --patience_scheduler (3)
  schedule.plateau_threshold  1e-4; plateau_threshold_mode "rel" | "abs"; plateau_cooldown 0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

Schedule = Callable[[Any], jax.Array]

OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
SCHEDULE_NAMES = ("warmup_cosine", "cosine", "constant", "reduce_on_plateau")


def default_optim_config() -> ml_collections.ConfigDict:
    """MI-Seg's optimizer defaults: AdamW 1e-4, wd 1e-5, and the warmup-cosine schedule of its README
    tuning runs (its CLI default, ReduceLROnPlateau(patience 3) on the validation loss, is one switch
    away: ``schedule.name="reduce_on_plateau"``)."""
    return ml_collections.ConfigDict(
        {
            "name": "adamw",
            "lr": 1e-4,
            "weight_decay": 1e-5,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "momentum": 0.99,
            "nesterov": True,
            "clip_norm": 0.0,
            "accumulate_steps": 1,
            "schedule": {
                "name": "warmup_cosine",
                "warmup_steps": 50,
                "total_steps": ml_collections.FieldReference(None, field_type=int),
                "cycles": 0.5,
                "warmup_multiplier": 0.0,
                "t_max": 200,
                "min_lr": 0.0,
                "steps_per_epoch": 1,
                "plateau_mode": "min",
                "plateau_metric": "loss",
                "plateau_factor": 0.1,
                "plateau_patience": 3,
                "plateau_threshold": 1e-4,
                "plateau_threshold_mode": "rel",
                "plateau_cooldown": 0,
            },
        }
    )


# ---------------------------------------------------------------------------------------- schedules


def warmup_cosine_schedule(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    cycles: float = 0.5,
    warmup_multiplier: float = 0.0,
) -> Schedule:
    """MONAI ``WarmupCosineSchedule``: linear warmup from ``warmup_multiplier·lr``, then cosine.

    Multiplier ``m + (1-m)·step/warmup`` for ``step < warmup``, else
    ``max(0, 0.5·(1 + cos(2π·cycles·progress)))`` with ``progress = (step-warmup)/(total-warmup)``.
    """
    if not 0.0 <= warmup_multiplier <= 1.0:
        raise ValueError(f"warmup_multiplier must be in [0, 1], got {warmup_multiplier}.")
    warmup = min(max(int(warmup_steps), 0), int(total_steps))
    decay_len = max(1, int(total_steps) - warmup)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = warmup_multiplier + (1.0 - warmup_multiplier) * s / max(1.0, warmup)
        progress = (s - warmup) / decay_len
        cos = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * progress)))
        return lr * jnp.where(s < warmup, warm, cos)

    return schedule


def cosine_annealing_schedule(lr: float, t_max: int, min_lr: float = 0.0) -> Schedule:
    """torch ``CosineAnnealingLR(T_max, eta_min)``; like torch it keeps oscillating past ``t_max``."""
    if t_max <= 0:
        raise ValueError(f"cosine schedule needs t_max > 0, got {t_max}.")

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * s / t_max))

    return schedule


def per_epoch(schedule: Schedule, steps_per_epoch: int) -> Schedule:
    """Holds ``schedule`` constant within each epoch of ``steps_per_epoch`` optimizer steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
    if steps_per_epoch == 1:
        return schedule
    return lambda step: schedule(jnp.asarray(step) // steps_per_epoch)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Schedule:
    """The lr schedule of ``config.optim`` (excluding the plateau multiplier)."""
    o = config.optim
    s = o.schedule
    if s.name == "warmup_cosine":
        total = s.total_steps or total_steps
        fn = warmup_cosine_schedule(o.lr, s.warmup_steps, total, s.cycles, s.warmup_multiplier)
    elif s.name == "cosine":
        fn = cosine_annealing_schedule(o.lr, s.t_max, s.min_lr)
    elif s.name in ("constant", "reduce_on_plateau"):
        fn = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"Unknown config.optim.schedule.name {s.name!r}; choose one of {SCHEDULE_NAMES}.")
    return per_epoch(fn, int(s.steps_per_epoch))


# ---------------------------------------------------------------------------------- lr multiplier


class LrMultiplierState(NamedTuple):
    """Host-settable factor applied to the updates (the plateau controller writes it)."""

    lr_multiplier: jax.Array


def scale_by_lr_multiplier() -> optax.GradientTransformation:
    """Multiplies updates by the ``lr_multiplier`` held in the state (initially 1)."""

    def init_fn(params):
        del params
        return LrMultiplierState(jnp.ones((), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u: u * state.lr_multiplier.astype(u.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _is_multiplier(x: Any) -> bool:
    return isinstance(x, LrMultiplierState)


def set_lr_multiplier(opt_state: Any, multiplier: float) -> Any:
    """A copy of ``opt_state`` with every ``lr_multiplier`` set to ``multiplier``, sharding kept.

    Call on the host between steps (works for multi-process, fully replicated states).
    """
    value = np.asarray(multiplier, np.float32)
    found = []

    def replace(node):
        if not _is_multiplier(node):
            return node
        found.append(True)
        old = node.lr_multiplier
        if isinstance(old, jax.Array):
            new = jax.make_array_from_callback(old.shape, old.sharding, lambda idx: value[idx])
        else:
            new = jnp.asarray(value)
        return LrMultiplierState(new)

    out = jax.tree.map(replace, opt_state, is_leaf=_is_multiplier)
    if not found:
        raise ValueError("opt_state has no lr_multiplier; build the optimizer with make_optimizer().")
    return out


class PlateauController:
    """torch ``ReduceLROnPlateau`` on the host, expressed as an lr multiplier.

    ``step(value)`` is called once per evaluation with the monitored value and returns the multiplier
    to write with :func:`set_lr_multiplier`. After more than ``patience`` evaluations without an
    improvement (``value < best·(1-threshold)`` in rel/min mode; ``> best·(1+threshold)`` in rel/max;
    ``best ∓ threshold`` in abs mode) the lr becomes ``max(lr·factor, min_lr)`` (skipped when the change
    is below ``eps``), then ``cooldown`` evaluations are ignored. NaN never counts as an improvement.
    """

    def __init__(
        self,
        lr: float,
        *,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"plateau mode must be 'min' or 'max', got {mode!r}.")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"plateau threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}.")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"plateau factor must be in (0, 1), got {factor}.")
        if lr <= 0:
            raise ValueError(f"PlateauController needs a positive base lr, got {lr}.")
        self.base_lr = float(lr)
        self.mode, self.factor, self.patience = mode, float(factor), int(patience)
        self.threshold, self.threshold_mode = float(threshold), threshold_mode
        self.cooldown, self.min_lr, self.eps = int(cooldown), float(min_lr), float(eps)
        self.lr = float(lr)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_counter = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PlateauController:
        s = config.optim.schedule
        return cls(
            config.optim.lr,
            mode=s.plateau_mode,
            factor=s.plateau_factor,
            patience=s.plateau_patience,
            threshold=s.plateau_threshold,
            threshold_mode=s.plateau_threshold_mode,
            cooldown=s.plateau_cooldown,
            min_lr=s.min_lr,
        )

    @property
    def multiplier(self) -> float:
        return self.lr / self.base_lr

    def _is_better(self, a: float) -> bool:
        if self.mode == "min":
            ref = (
                self.best * (1.0 - self.threshold)
                if self.threshold_mode == "rel"
                else self.best - self.threshold
            )
            return a < ref
        ref = (
            self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        )
        return a > ref

    def step(self, value: float) -> float:
        """Feeds one evaluation value; returns the (possibly reduced) lr multiplier."""
        current = float(value)
        if self._is_better(current):
            self.best = current
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad = 0
        return self.multiplier

    def state_dict(self) -> dict[str, float]:
        return {
            "lr": self.lr,
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.num_bad, self.cooldown_counter = int(state["num_bad"]), int(state["cooldown_counter"])


class PlateauSchedule:
    """``schedule.name="reduce_on_plateau"`` in the training loop: feeds each evaluation to a
    :class:`PlateauController` and writes the resulting multiplier into the optimizer state.

    ``schedule.plateau_metric`` picks the evaluation value: ``"loss"`` (MI-Seg's validation loss; the
    evaluation then computes it, see :attr:`needs_eval_loss`) or ``"dice"`` (mean Dice).
    """

    RESULT_KEYS = {"loss": "loss", "dice": "mean_dice"}

    def __init__(self, config: ml_collections.ConfigDict):
        self.metric = config.optim.schedule.plateau_metric
        if self.metric not in self.RESULT_KEYS:
            raise ValueError(f"plateau_metric must be one of {tuple(self.RESULT_KEYS)}, got {self.metric!r}.")
        self.controller = PlateauController.from_config(config)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PlateauSchedule | None:
        """The wiring when the config asks for a plateau schedule, else None."""
        return cls(config) if config.optim.schedule.name == "reduce_on_plateau" else None

    @property
    def needs_eval_loss(self) -> bool:
        return self.metric == "loss"

    def update(self, opt_state: Any, results: dict[str, Any]) -> Any:
        """``opt_state`` with the multiplier after feeding one evaluation's ``results``."""
        multiplier = self.controller.step(results[self.RESULT_KEYS[self.metric]])
        return set_lr_multiplier(opt_state, multiplier)

    def state_dict(self) -> dict[str, float]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.controller.load_state_dict(state)


# ---------------------------------------------------------------------------------------- optimizer


def _core(o: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    wd = float(o.weight_decay)
    if o.name in ("adamw", "adam"):
        adam = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
        if not wd:
            return [adam]
        decay = optax.add_decayed_weights(wd)
        return [adam, decay] if o.name == "adamw" else [decay, adam]  # AdamW decays after, Adam's L2 before
    if o.name == "sgd":
        parts = [optax.add_decayed_weights(wd)] if wd else []
        if o.momentum:
            parts.append(optax.trace(decay=float(o.momentum), nesterov=bool(o.nesterov)))
        return parts
    raise ValueError(f"Unknown config.optim.name {o.name!r}; choose one of {OPTIMIZER_NAMES}.")


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds ``(tx, schedule)`` from ``config.optim`` (see the module docstring for the keys).

    ``total_steps`` is the number of optimizer updates of the run (the warmup-cosine horizon unless
    ``schedule.total_steps`` is set). ``schedule(step)`` is the lr before the plateau multiplier.
    """
    if "optim" not in config:
        raise ValueError("make_optimizer expects the root config with an 'optim' section.")
    o = config.optim
    schedule = make_schedule(config, total_steps)
    parts = []
    clip = o.clip_norm
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts += _core(o)
    parts += [optax.scale_by_learning_rate(schedule), scale_by_lr_multiplier()]
    tx = optax.chain(*parts)
    k = int(o.accumulate_steps)
    if k < 1:
        raise ValueError(f"config.optim.accumulate_steps must be >= 1, got {k}.")
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule
