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

:func:`patch_info_nce` is not a segmentation loss: it compares two feature maps (an image and its
restyled copy, see :mod:`cinjax.data.style`) patch by patch, for single-source generalization.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

LOSS_NAMES = ("dice_focal", "generalized_dice_focal", "dice_ce", "dice", "generalized_dice", "focal", "ce")


def _flatten(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Checks the shapes; returns float32 logits (B, V, K) and integer labels (B, V)."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be channels-last (B, ..., K), got shape {logits.shape}.")
    if labels.ndim == logits.ndim and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits {logits.shape} without the class axis; "
            "pass integer labels of shape (B, D, H, W) (or (B, D, H, W, 1))."
        )
    x = logits.astype(jnp.float32).reshape(logits.shape[0], -1, logits.shape[-1])
    return x, labels.astype(jnp.int32).reshape(labels.shape[0], -1)


def _prepare(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Returns float32 logits (B, V, K) and a float32 one-hot target (B, V, K)."""
    x, labels = _flatten(logits, labels)
    return x, jax.nn.one_hot(labels, x.shape[-1], dtype=jnp.float32)


def _first_class(include_background: bool, num_classes: int) -> int:
    """The first class the Dice and focal terms use: 0, or 1 without the background."""
    if include_background:
        return 0
    if num_classes < 2:
        raise ValueError("include_background=False needs at least two classes.")
    return 1


def _drop_background(*arrays: Array, include_background: bool) -> tuple[Array, ...]:
    first = _first_class(include_background, arrays[0].shape[-1])
    return tuple(a[..., first:] for a in arrays)


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
    """MI-Seg's default criterion (DiceFocalLoss). Returns (total, {"dice", "focal"}).

    The same values as ``dice_loss`` plus ``sigmoid_focal_loss``, computed in one pass with a hand-written
    backward pass (:func:`_dice_focal_terms`).
    """
    x, labels = _flatten(logits, labels)
    first = _first_class(include_background, x.shape[-1])
    options = (first, bool(squared_pred), float(smooth_nr), float(smooth_dr), float(gamma))
    d, f = _dice_focal_terms(x, labels, options)
    return lambda_dice * d + lambda_focal * f, {"dice": d, "focal": f}


def _focal_parts(z: Array, gamma: float) -> tuple[Array, Array, Array]:
    """For ``z = -x·(2t-1)`` with a 0/1 target: the focal modulator ``sigmoid(z)^γ``, the BCE with logits
    ``softplus(z)`` and ``sigmoid(z)``, from one exponential and one log1p."""
    e = jnp.exp(-jnp.abs(z))
    log1p_e = jnp.log1p(e)
    modulator = jnp.exp(gamma * (jnp.minimum(z, 0.0) - log1p_e))
    return modulator, jnp.maximum(z, 0.0) + log1p_e, jnp.where(z >= 0.0, 1.0, e) / (1.0 + e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dice_focal_terms(x: Array, labels: Array, options: tuple) -> tuple[Array, Array]:
    """The Dice and focal terms of float32 logits ``(B, V, K)`` and integer labels ``(B, V)``.

    ``options = (first_class, squared_pred, smooth_nr, smooth_dr, gamma)``; classes below ``first_class``
    are left out of both terms. The one-hot target is never materialised and the backward pass is one
    elementwise expression of the logits and a few per-(sample, class) sums, where autodiff through the
    softmax, the one-hot target and the focal term's separate softplus and log-sigmoid stores several
    full-size intermediates.
    """
    return _dice_focal_fwd(x, labels, options)[0]


def _dice_focal_common(x, labels, first):
    k = x.shape[-1]
    hot = labels[..., None] == jnp.arange(k)
    used = jnp.arange(k) >= first
    return hot, used, jax.nn.softmax(x, axis=-1)


def _dice_focal_fwd(x, labels, options):
    first, squared, smooth_nr, smooth_dr, gamma = options
    hot, used, p = _dice_focal_common(x, labels, first)
    intersection = jnp.sum(jnp.where(hot, p, 0.0), axis=1)
    ground = jnp.sum(hot.astype(jnp.float32), axis=1)
    denominator = ground + jnp.sum(p * p if squared else p, axis=1) + smooth_dr
    dice = jnp.mean((1.0 - (2.0 * intersection + smooth_nr) / denominator)[:, first:])
    modulator, bce, _ = _focal_parts(jnp.where(hot, -x, x), gamma)
    focal = jnp.sum(jnp.where(used, modulator * bce, 0.0)) / (x.shape[0] * x.shape[1] * (x.shape[2] - first))
    return (dice, focal), (x, labels, intersection, denominator)


def _dice_focal_bwd(options, residuals, cotangents):
    first, squared, smooth_nr, _, gamma = options
    x, labels, intersection, denominator = residuals
    g_dice, g_focal = cotangents
    b, v, k = x.shape
    hot, used, p = _dice_focal_common(x, labels, first)
    # Dice: d/dp of -(2I + nr) / den per (sample, class), averaged over the B * (K - first) terms.
    per_class = g_dice / (b * (k - first))
    a_hot = (per_class * 2.0 / denominator)[:, None, :]
    a_pred = (per_class * (2.0 * intersection + smooth_nr) / (denominator * denominator))[:, None, :]
    dp = jnp.where(used, (2.0 * p if squared else 1.0) * a_pred - jnp.where(hot, a_hot, 0.0), 0.0)
    dx = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
    # Focal: d/dz of sigmoid(z)^γ · softplus(z), z = ∓x.
    z = jnp.where(hot, -x, x)
    modulator, bce, sig = _focal_parts(z, gamma)
    dz = (g_focal / (b * v * (k - first))) * modulator * (gamma * (1.0 - sig) * bce + sig)
    dx = dx + jnp.where(used, jnp.where(hot, -dz, dz), 0.0)
    return dx, None


_dice_focal_terms.defvjp(_dice_focal_fwd, _dice_focal_bwd)


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


def sample_patch_indices(key: Array, batch: int, num_locations: int, num_patches: int) -> Array:
    """``(batch, num_patches)`` int32 flat locations in ``[0, num_locations)``, distinct within a row.

    Uniform sampling without replacement per sample: the ``num_patches`` largest of i.i.d. uniforms
    (``lax.top_k``), which is jit-able, needs no host sync and shards along the batch axis.
    """
    if not 1 <= num_patches <= num_locations:
        raise ValueError(
            f"num_patches={num_patches} must be in [1, {num_locations}] (the feature map's locations)."
        )
    scores = jax.random.uniform(key, (batch, num_locations))
    return jax.lax.top_k(scores, num_patches)[1].astype(jnp.int32)


def patch_info_nce(
    feat_a: Array,
    feat_b: Array,
    key: Array | None = None,
    *,
    indices: Array | None = None,
    num_patches: int = 256,
    temperature: float = 0.07,
    eps: float = 1e-12,
    project: Callable[[Array], Array] | None = None,
) -> Array:
    """Symmetric patch-wise InfoNCE between the feature maps of an image and its restyled copy.

    ``feat_a``, ``feat_b``: channels-last ``(B, *spatial, C)`` features (any float dtype; computed in
    float32). Per sample, the same P locations are taken from both maps: drawn with ``key`` (P =
    ``num_patches``, see :func:`sample_patch_indices`) or given as flat ``indices`` ``(B, P)`` into the
    spatial grid (row-major; not range-checked under ``jit``). ``project`` (a projection head, the same
    for both copies) maps the sampled ``(B, P, C)`` features to ``(B, P, C')`` first. Features are
    L2-normalised (norm floored
    at ``eps``, as torch ``F.normalize``), ``logits[i, j] = <a_i, b_j> / temperature`` over the P
    patches of the sample, and the loss is the cross entropy with the same patch as the positive, a→b
    (rows) and b→a (columns) averaged, mean over patches and samples. Returns a float32 scalar; it pulls
    the same patch of both copies together and pushes the sample's other patches apart.
    """
    if feat_a.shape != feat_b.shape:
        raise ValueError(f"feat_a shape {feat_a.shape} != feat_b shape {feat_b.shape}.")
    if feat_a.ndim < 3:
        raise ValueError(f"features must be channels-last (B, ..., C), got shape {feat_a.shape}.")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if (key is None) == (indices is None):
        raise ValueError("pass exactly one of key (to sample the patches) and indices (B, P).")
    batch, channels = feat_a.shape[0], feat_a.shape[-1]
    a = feat_a.astype(jnp.float32).reshape(batch, -1, channels)
    b = feat_b.astype(jnp.float32).reshape(batch, -1, channels)
    if indices is None:
        indices = sample_patch_indices(key, batch, a.shape[1], num_patches)
    elif indices.ndim != 2 or indices.shape[0] != batch:
        raise ValueError(f"indices must have shape (B={batch}, P), got {indices.shape}.")
    idx = indices.astype(jnp.int32)[..., None]
    a = jnp.take_along_axis(a, idx, axis=1)
    b = jnp.take_along_axis(b, idx, axis=1)
    if project is not None:
        a, b = project(a).astype(jnp.float32), project(b).astype(jnp.float32)
    a = a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), eps * eps))
    b = b * jax.lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1, keepdims=True), eps * eps))
    logits = jnp.einsum("bpc,bqc->bpq", a, b, precision=jax.lax.Precision.HIGHEST) / temperature
    diag_ab = jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=1, axis2=2)
    diag_ba = jnp.diagonal(jax.nn.log_softmax(logits, axis=-2), axis1=1, axis2=2)
    return -0.5 * (jnp.mean(diag_ab) + jnp.mean(diag_ba))
