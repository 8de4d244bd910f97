"""Pure train / predict step functions (jitted by the caller with explicit shardings).

The train step never corrupts the state: if the loss, the gradient norm or the update's norm is not
finite (a finite gradient can still give a NaN update: Adam's 0/0 with ``eps=0``, an overflowing
learning rate), the update is skipped (params, optimizer state and step stay as they were) and
``metrics["finite"]`` is 0, so the host can stop with the last good state intact and name the step; a
non-finite state is never returned, so it is never saved.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cinjax import losses
from cinjax.models.blocks.projection import ProjectionHead

LossFn = Callable[[jax.Array, jax.Array], Any]
INFO_NCE_HEAD = "info_nce_head"  # the params entry of the InfoNCE projection head (training only)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any  # non-param collections (e.g. batch_stats); {} for instance-norm models


def _loss_terms(out: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Losses may return a scalar or ``(scalar, {name: part})``."""
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


@dataclasses.dataclass(frozen=True)
class PairInfoNCE:
    """The patch-wise InfoNCE term of style training (:func:`cinjax.losses.patch_info_nce`) between the
    features of each crop and of its restyled copy at the module ``layer`` (a module path), through a
    learned projection head when ``projection`` > 0."""

    layer: str
    weight: float
    temperature: float = 0.07
    num_patches: int = 128
    projection: int = 0  # width of the projection head (0: compare the features themselves)


def _with_pairs(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(image, label, modality)``; with ``"image_style"`` in the batch, rows ``2i`` / ``2i + 1`` are
    crop ``i`` and its restyled copy (same label, same modality row), so each pair stays on its device."""
    image, label, modality = batch["image"], batch["label"], batch["modality"]
    if "image_style" not in batch:
        return image, label, modality
    pairs = jnp.stack([image, batch["image_style"].astype(image.dtype)], axis=1)
    return pairs.reshape(-1, *image.shape[1:]), jnp.repeat(label, 2, axis=0), jnp.repeat(modality, 2, axis=0)


def _captured(intermediates: Any, layer: str) -> jax.Array:
    """The output of module ``layer`` recorded by ``capture_intermediates``."""
    found = [
        value
        for path, value in jax.tree_util.tree_flatten_with_path(
            intermediates, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
        if getattr(path[-1], "key", None) == "__call__"
    ]
    if len(found) != 1 or len(found[0]) != 1 or not isinstance(found[0][0], jax.Array):
        raise ValueError(
            f"style.info_nce_layer={layer!r} must name one module of the model that returns one feature "
            "map (a module path such as 'down_1_0' for unet_vanilla or 'encoder3' for swin_unetr)."
        )
    return found[0][0]


def _capture_layer(layer: str) -> Callable[[nn.Module, str], bool]:
    """``capture_intermediates`` filter recording the output of module ``layer`` only."""
    return lambda mdl, method: method == "__call__" and "/".join(mdl.path) == layer


def _features(
    model: nn.Module, variables: dict[str, Any], sample: dict[str, jax.Array], layer: str, train: bool
) -> jax.Array:
    """The feature map of module ``layer`` for ``sample`` (shape inference of the projection head)."""
    _, state = model.apply(
        variables,
        sample["image"],
        sample["modality"],
        train=train,
        mutable=["intermediates"],
        capture_intermediates=_capture_layer(layer),
    )
    return _captured(state["intermediates"], layer)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample: dict[str, jax.Array],
    seed: int,
    info_nce: PairInfoNCE | None = None,
) -> TrainState:
    """Initialise params (fp32) and optimizer state from one sample batch; with an InfoNCE projection
    head (``info_nce.projection``) its params are ``params[INFO_NCE_HEAD]``, next to the model's.

    Params are drawn with an ``rbg`` key: XLA compiles its bit generator ~5x faster than threefry's
    (30 s vs 7 s for a small UNet init on a 2-core CPU); the step's dropout key stays threefry.
    """
    init_rng = jax.random.key(seed, impl="rbg")
    rng = jax.random.fold_in(jax.random.key(seed), 1)
    variables = model.init(init_rng, sample["image"], sample["modality"], train=False)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    if info_nce is not None and info_nce.projection:
        feats = jax.eval_shape(
            lambda: _features(model, {"params": params, **variables}, sample, info_nce.layer, False)
        )
        head = ProjectionHead(info_nce.projection)
        params[INFO_NCE_HEAD] = head.init(
            jax.random.fold_in(init_rng, 1), jnp.zeros((1, feats.shape[-1]), jnp.float32)
        )["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng),
        model_state=variables,
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    info_nce: PairInfoNCE | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch ``{"image", "label", "modality"}``.

    With ``"image_style"`` (style training) every crop and its restyled copy are segmented (the loss
    covers both), and ``info_nce`` adds ``weight * InfoNCE`` of their features (``parts["info_nce"]``).
    """
    rng = jax.random.wrap_key_data(state.rng)
    rng, dropout_rng, nce_rng = jax.random.split(rng, 3)
    dropout_rng = jax.random.fold_in(dropout_rng, state.step)
    nce_rng = jax.random.fold_in(nce_rng, state.step)
    mutable = list(state.model_state.keys())
    image, label, modality = _with_pairs(batch)
    capture = info_nce is not None and "image_style" in batch
    if info_nce is not None and not capture:
        raise ValueError("The InfoNCE term needs (original, restyled) pairs: a loader with style.enabled.")

    def compute_loss(params):
        params = dict(params)
        head = params.pop(INFO_NCE_HEAD, None)
        variables = {"params": params, **state.model_state}
        collections = mutable + (["intermediates"] if capture else [])
        out = model.apply(
            variables,
            image,
            modality,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=collections or False,
            capture_intermediates=_capture_layer(info_nce.layer) if capture else False,
        )
        logits, new_model_state = out if collections else (out, {})
        new_model_state = dict(new_model_state)
        intermediates = new_model_state.pop("intermediates", None)
        loss, parts = _loss_terms(loss_fn(logits.astype(jnp.float32), label))
        if capture:
            feats = _captured(intermediates, info_nce.layer)
            feats = feats.reshape(-1, 2, *feats.shape[1:])
            project = None
            if head is not None:
                project = functools.partial(ProjectionHead(info_nce.projection).apply, {"params": head})
            nce = losses.patch_info_nce(
                feats[:, 0],
                feats[:, 1],
                nce_rng,
                num_patches=min(info_nce.num_patches, int(np.prod(feats.shape[2:-1]))),
                temperature=info_nce.temperature,
                project=project,
            )
            parts["info_nce"] = nce
            loss = loss + info_nce.weight * nce
        return loss, (parts, new_model_state)

    (loss, (parts, new_model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A finite loss and gradient norm imply finite gradients and Adam moments (a squared gradient that
    # overflows makes the norm infinite); a finite update norm then implies finite new parameters. These
    # three scalars are the same guard as testing every entry of the new state, which made XLA:CPU's
    # compile of the step 6x longer.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=jnp.where(finite, state.step + 1, state.step),
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        model_state=keep_if_finite(flax.core.unfreeze(new_model_state), state.model_state),
        rng=jax.random.key_data(rng),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32), **parts}
    return new_state, metrics


def predict_logits(
    variables: dict[str, Any],
    windows: jax.Array,
    modality: jax.Array,
    *,
    model: nn.Module,
    flips: tuple[tuple[int, ...], ...] = (),
) -> jax.Array:
    """Logits (fp32) of a batch of windows, each with its own modality id.

    ``flips`` (mirroring test-time augmentation): spatial axis subsets (0: D, 1: H, 2: W); the windows
    are also run mirrored along each subset, in the same batch, and the logits mirrored back and
    averaged (``()`` in the subsets is the unmirrored pass).
    """
    if not flips:
        return model.apply(variables, windows, modality, train=False).astype(jnp.float32)
    batch = jnp.concatenate([jnp.flip(windows, [1 + a for a in axes]) for axes in flips])
    logits = model.apply(variables, batch, jnp.tile(modality, len(flips)), train=False).astype(jnp.float32)
    parts = jnp.split(logits, len(flips))
    return sum(jnp.flip(p, [1 + a for a in axes]) for p, axes in zip(parts, flips)) / len(flips)
