"""Segmentation losses with MONAI 1.1.0 numerics (the version MI-Seg trained with).

All losses take channels-last logits ``(B, D, H, W, K)`` (any float dtype; computed in float32) and
integer labels ``(B, D, H, W)`` (a trailing singleton channel is accepted) with values in ``[0, K)``;
out-of-range labels cannot be checked under ``jit`` and one-hot to all zeros. Each returns a float32
scalar. Semantics (see docs/mi-seg-spec.md §5.1):

* Dice: softmax over classes, one-hot target, per (sample, class) over voxels
    ``1 - (2·Σpt + smooth_nr) / (Σt^a + Σp^a + smooth_dr)`` with ``a = 2`` when ``squared_pred`` else 1,
    then the mean over samples and classes. A class absent from a sample's target contributes exactly 1
    (with ``smooth_nr = 0``) and no gradient.
* Focal (MONAI 1.1.0 ``FocalLoss``): a *sigmoid* (binary, per channel) focal loss on the raw logits, not
    on the softmax: ``sigmoid(-x·(2t-1))^γ · BCEWithLogits(x, t)``, mean over voxels, then over
    (sample, class). No alpha.
* Generalized Dice (MONAI 1.1.0 ``GeneralizedDiceLoss``, weight type "square"): per (sample, class)
    weight ``w = 1/(Σt)^2``, absent classes get the sample's largest finite weight, then
    ``1 - (2·I·w + nr) / ((G+P)·w + dr)`` per class (NOT summed over classes, unlike MONAI >= 1.2),
    mean over (sample, class).
* Cross entropy: softmax cross entropy, mean over all voxels of all samples.

``include_background=False`` drops class 0 from the Dice and focal terms after the softmax (MONAI
semantics); the cross-entropy term of ``dice_ce`` always uses every class, as MONAI's DiceCELoss does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

LOSS_NAMES = ("dice_focal", "generalized_dice_focal", "dice_ce", "dice", "generalized_dice", "focal", "ce")


def _prepare(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Returns float32 logits (B, V, K) and a float32 one-hot target (B, V, K)."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be channels-last (B, ..., K), got shape {logits.shape}.")
    if labels.ndim == logits.ndim and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits {logits.shape} without the class axis; "
            "pass integer labels of shape (B, D, H, W) (or (B, D, H, W, 1))."
        )
    num_classes = logits.shape[-1]
    x = logits.astype(jnp.float32).reshape(logits.shape[0], -1, num_classes)
    t = jax.nn.one_hot(labels.astype(jnp.int32).reshape(labels.shape[0], -1), num_classes, dtype=jnp.float32)
    return x, t


def _drop_background(*arrays: Array, include_background: bool) -> tuple[Array, ...]:
    if include_background:
        return arrays
    if arrays[0].shape[-1] < 2:
        raise ValueError("include_background=False needs at least two classes.")
    return tuple(a[..., 1:] for a in arrays)


def dice_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    squared_pred: bool = False,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-6,
) -> Array:
    """Soft Dice loss on softmax probabilities (MONAI DiceLoss, softmax + one-hot target)."""
    x, t = _prepare(logits, labels)
    p = jax.nn.softmax(x, axis=-1)
    p, t = _drop_background(p, t, include_background=include_background)
    intersection = jnp.sum(p * t, axis=1)
    if squared_pred:
        ground, pred = jnp.sum(t * t, axis=1), jnp.sum(p * p, axis=1)
    else:
        ground, pred = jnp.sum(t, axis=1), jnp.sum(p, axis=1)
    f = 1.0 - (2.0 * intersection + smooth_nr) / (ground + pred + smooth_dr)
    return jnp.mean(f)


def generalized_dice_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-6,
) -> Array:
    """MONAI 1.1.0 GeneralizedDiceLoss (softmax, square weights, per-class form; see module doc)."""
    x, t = _prepare(logits, labels)
    p = jax.nn.softmax(x, axis=-1)
    p, t = _drop_background(p, t, include_background=include_background)
    intersection = jnp.sum(p * t, axis=1)
    ground = jnp.sum(t, axis=1)
    denominator = ground + jnp.sum(p, axis=1)
    present = ground > 0
    w = jnp.where(present, 1.0 / jnp.where(present, ground * ground, 1.0), 0.0)
    w = jnp.where(present, w, jnp.max(w, axis=1, keepdims=True))
    f = 1.0 - (2.0 * intersection * w + smooth_nr) / (denominator * w + smooth_dr)
    return jnp.mean(f)


def sigmoid_focal_loss(
    logits: Array,
    labels: Array,
    *,
    gamma: float = 2.0,
    include_background: bool = True,
) -> Array:
    """MONAI 1.1.0 FocalLoss: per-channel sigmoid focal loss on raw logits vs the one-hot target."""
    x, t = _prepare(logits, labels)
    x, t = _drop_background(x, t, include_background=include_background)
    bce = jax.nn.softplus(x) - x * t
    modulator = jnp.exp(gamma * jax.nn.log_sigmoid(-x * (2.0 * t - 1.0)))
    return jnp.mean(jnp.mean(modulator * bce, axis=1))


def cross_entropy_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross entropy over all classes, mean over voxels and samples (torch CrossEntropyLoss)."""
    x, t = _prepare(logits, labels)
    return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(x, axis=-1), axis=-1))


def dice_focal_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    squared_pred: bool = True,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-6,
    gamma: float = 2.0,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """MI-Seg's default criterion (DiceFocalLoss). Returns (total, {"dice", "focal"})."""
    d = dice_loss(
        logits,
        labels,
        include_background=include_background,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
    )
    f = sigmoid_focal_loss(logits, labels, gamma=gamma, include_background=include_background)
    return lambda_dice * d + lambda_focal * f, {"dice": d, "focal": f}


def generalized_dice_focal_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-6,
    gamma: float = 2.0,
    lambda_gdl: float = 1.0,
    lambda_focal: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """GeneralizedDiceFocalLoss (MONAI 1.1.0 form). Returns (total, {"dice", "focal"})."""
    d = generalized_dice_loss(
        logits, labels, include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr
    )
    f = sigmoid_focal_loss(logits, labels, gamma=gamma, include_background=include_background)
    return lambda_gdl * d + lambda_focal * f, {"dice": d, "focal": f}


def dice_ce_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    squared_pred: bool = False,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-6,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """DiceCELoss. The CE term always uses every class. Returns (total, {"dice", "ce"})."""
    d = dice_loss(
        logits,
        labels,
        include_background=include_background,
        squared_pred=squared_pred,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
    )
    c = cross_entropy_loss(logits, labels)
    return lambda_dice * d + lambda_ce * c, {"dice": d, "ce": c}


_COMPOUND = {
    "dice_focal": dice_focal_loss,
    "generalized_dice_focal": generalized_dice_focal_loss,
    "dice_ce": dice_ce_loss,
}
_SINGLE = {
    "dice": dice_loss,
    "generalized_dice": generalized_dice_loss,
    "focal": sigmoid_focal_loss,
    "ce": cross_entropy_loss,
}


def get_loss(name: str, *, return_parts: bool = False, **kwargs) -> Callable[[Array, Array], Array]:
    """Returns ``loss(logits, labels)`` by MI-Seg criterion name, with keyword options bound.

    Names: dice_focal (MI-Seg default; squared_pred defaults to True), generalized_dice_focal, dice_ce
    (squared_pred defaults to False), and the single terms dice, generalized_dice, focal, ce. With
    ``return_parts=True`` the callable returns ``(total, parts)`` where ``parts`` maps term names
    ("dice", "focal" or "ce") to float32 scalars, for logging.
    """
    if name in _COMPOUND:
        fn = functools.partial(_COMPOUND[name], **kwargs)
        if return_parts:
            return fn
        return lambda logits, labels: fn(logits, labels)[0]
    if name in _SINGLE:
        fn = functools.partial(_SINGLE[name], **kwargs)
        if not return_parts:
            return fn

        def with_parts(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
            value = fn(logits, labels)
            return value, {name: value}

        return with_parts
    raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
