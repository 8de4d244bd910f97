"""Normalisation layers (channels-last) and the norm factory keyed by MI-Seg's names.

Every norm here has the same call signature ``norm(x, modality=None, train=False)`` so that blocks can
take any of them from config. Statistics are always computed in float32, whatever the compute dtype,
and the result is cast back to the input dtype.

* :class:`ConditionalInstanceNorm` (MI-Seg ``instance_cond``): instance-norm statistics per sample and
  channel over every axis but batch and channel (a volume ``(B, D, H, W, C)`` or a Swin token grid: the
  whole stage, as MI-Seg does, not per token), then a per-modality affine
  ``scale[modality[b], c]``, ``bias[modality[b], c]`` gathered in one vectorized op.
* :class:`InstanceNorm` (``instance``; affine or not), :class:`LayerNorm` (``layer``, over channels),
  :class:`BatchNorm` (``batch``), :class:`GroupNorm` (``group``).

CIN and the affine instance norm go through :func:`instance_norm_affine`, whose backward pass is
written by hand (fewer passes over the activations than autodiff's). Given a PReLU slope
(``prelu_slope=``, as MI-Seg's conv blocks follow the norm with PReLU) they apply both through
:func:`instance_norm_prelu`, one custom VJP with one-pass statistics that stores only its input.

Blocks take a :class:`NormSpec` (which norm to build, hashable so it can be a module field) and call
``spec.make(module_name)``; nets turn their config fields (``encoder_norm``, ``norm_affine``, ...) into specs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-5
NORM_NAMES = ("instance_cond", "instance", "layer", "batch", "group")
FUSES_PRELU = ("instance_cond", "instance")  # norms that apply a following PReLU themselves


def check_modality_ids(modality: Any, num_modalities: int, names: Sequence[str] | None = None) -> None:
    """Raise a ``ValueError`` if a concrete modality id lies outside ``[0, num_modalities)``.

    Call this on the host where ids enter (loader, inference, CLI). Traced values (inside ``jit``)
    are not checkable here; for those :class:`ConditionalInstanceNorm` yields NaN instead of silently
    using another modality's parameters.
    """
    if isinstance(modality, jax.core.Tracer):
        return
    ids = np.asarray(modality)
    if ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Modality ids must be integers, got dtype {ids.dtype}.")
    bad = ids[(ids < 0) | (ids >= num_modalities)]
    if bad.size:
        valid = (
            ", ".join(f"{i} ({n})" for i, n in enumerate(names))
            if names is not None
            else ", ".join(str(i) for i in range(num_modalities))
        )
        raise ValueError(
            f"Modality id(s) {sorted(set(bad.tolist()))} out of range: this model has "
            f"{num_modalities} modalities, valid ids are {valid}."
        )


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """fp32 mean and biased variance (two-pass, numerically stable)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return mean, var


def instance_normalize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """Normalise each sample and channel over all other axes (fp32 result)."""
    axes = tuple(range(1, x.ndim - 1))
    if not axes:
        raise ValueError(f"Instance norm needs at least one spatial axis, got shape {x.shape}.")
    mean, var = _moments(x, axes)
    return (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def instance_norm_affine(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = EPS) -> jax.Array:
    """``instance_normalize(x) * scale + bias`` with a per-sample, per-channel affine (``scale`` and
    ``bias`` of shape ``(B, C)``, fp32), in ``x``'s dtype.

    Its hand-written backward pass makes two passes over ``x`` and the output gradient (one reduction for
    the scale and bias gradients, one elementwise pass for ``dx``), where autodiff through the two-pass
    moments makes several more. Statistics and gradients are fp32 whatever ``x``'s dtype.
    """
    return _instance_norm_affine_fwd(x, scale, bias, eps)[0]


def _normalize_affine(x, scale, bias, eps, moments):
    """The fp32 output ``(x - mean) * rstd * g + b`` and its ``mean``, ``rstd``, ``g``, ``b`` (broadcastable
    to ``x``), with the statistics from ``moments(x, axes)``."""
    axes = tuple(range(1, x.ndim - 1))
    if not axes:
        raise ValueError(f"Instance norm needs at least one spatial axis, got shape {x.shape}.")
    mean, var = moments(x, axes)
    rstd = jax.lax.rsqrt(var + eps)
    bshape = (x.shape[0],) + (1,) * len(axes) + (x.shape[-1],)
    g, b = scale.astype(jnp.float32).reshape(bshape), bias.astype(jnp.float32).reshape(bshape)
    return (x.astype(jnp.float32) - mean) * (rstd * g) + b, mean, rstd, g, b


def _normalize_affine_grads(x, xhat, rstd, g, dy):
    """``dx`` (in ``x``'s dtype) and the ``(B, C)`` scale and bias gradients of :func:`_normalize_affine`
    from the fp32 gradient ``dy`` of its output (``xhat = (x - mean) * rstd``)."""
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1])
    dbias = jnp.sum(dy, axis=axes, keepdims=True)
    dscale = jnp.sum(dy * xhat, axis=axes, keepdims=True)
    dx = (rstd * g) * (dy - dbias / count - xhat * (dscale / count))
    shape = (x.shape[0], x.shape[-1])
    return dx.astype(x.dtype), dscale.reshape(shape), dbias.reshape(shape)


def _instance_norm_affine_fwd(x, scale, bias, eps):
    y, mean, rstd, g, _ = _normalize_affine(x, scale, bias, eps, _moments)
    return y.astype(x.dtype), (x, mean, rstd, g)


def _instance_norm_affine_bwd(eps, residuals, dy):
    x, mean, rstd, g = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    return _normalize_affine_grads(x, xhat, rstd, g, dy.astype(jnp.float32))


instance_norm_affine.defvjp(_instance_norm_affine_fwd, _instance_norm_affine_bwd)


def _one_pass_moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """fp32 mean and biased variance from one pass over ``x`` (the sums of ``d`` and ``d^2`` together).

    ``d = x - shift``, with ``shift`` the mean of the first slice along the first spatial axis: the
    cancellation in ``E[d^2] - E[d]^2`` then grows with how far the mean lies from that slice's mean, in
    standard deviations, not from zero (a plain one-pass variance of conv outputs with a large offset loses
    every digit).
    """
    x32 = x.astype(jnp.float32)
    shift = jnp.mean(x32[:, :1], axis=axes, keepdims=True)
    d = x32 - shift
    n = math.prod(x.shape[a] for a in axes)
    s1, s2 = jnp.sum(d, axis=axes, keepdims=True) / n, jnp.sum(d * d, axis=axes, keepdims=True) / n
    return shift + s1, jnp.maximum(s2 - s1 * s1, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def instance_norm_prelu(
    x: jax.Array, scale: jax.Array, bias: jax.Array, slope: jax.Array, eps: float = EPS
) -> jax.Array:
    """``prelu(instance_norm_affine(x, scale, bias), slope)`` in ``x``'s dtype, from one pass of fp32
    statistics; ``slope`` is PReLU's shared scalar.

    The backward pass recomputes the norm's output from the stored input (its only full-size residual,
    in ``x``'s dtype: bf16 under bf16 compute) and makes two passes over ``x`` and the output gradient:
    one multi-output reduction (the scale, bias and slope gradients) and one elementwise pass for ``dx``.
    Apart, the norm stores its input and PReLU its own, and PReLU's input gradient is written and read
    back between the two. Statistics and gradients are fp32.
    """
    return _instance_norm_prelu_fwd(x, scale, bias, slope, eps)[0]


def _instance_norm_prelu_fwd(x, scale, bias, slope, eps):
    y, mean, rstd, g, b = _normalize_affine(x, scale, bias, eps, _one_pass_moments)
    a = slope.astype(jnp.float32)
    return jnp.where(y >= 0, y, a * y).astype(x.dtype), (x, mean, rstd, g, b, slope)


def _instance_norm_prelu_bwd(eps, residuals, dz):
    x, mean, rstd, g, b, slope = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    y = xhat * g + b
    dz32 = dz.astype(jnp.float32)
    positive = y >= 0
    dy = jnp.where(positive, dz32, slope.astype(jnp.float32) * dz32)
    dslope = jnp.sum(jnp.where(positive, 0.0, dz32 * y))
    return *_normalize_affine_grads(x, xhat, rstd, g, dy), dslope.astype(slope.dtype)


instance_norm_prelu.defvjp(_instance_norm_prelu_fwd, _instance_norm_prelu_bwd)


def _affine_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, prelu_slope: Any) -> jax.Array:
    """The instance norm with per-sample affine ``(B, C)``, then PReLU where a slope is given."""
    if prelu_slope is None:
        return instance_norm_affine(x, scale, bias, eps)
    return instance_norm_prelu(x, scale, bias, jnp.asarray(prelu_slope), eps)


def layer_normalize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """Normalise each position over the channel axis (fp32 result, no affine)."""
    mean, var = _moments(x, (x.ndim - 1,))
    return (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)


def _channel_affine(module: nn.Module, y: jax.Array, param_dtype: Any) -> jax.Array:
    """``y * scale + bias`` with per-channel params ``scale`` (ones) and ``bias`` (zeros) of ``module``."""
    c = y.shape[-1]
    y = y * module.param("scale", nn.initializers.ones, (c,), param_dtype).astype(jnp.float32)
    return y + module.param("bias", nn.initializers.zeros, (c,), param_dtype).astype(jnp.float32)


CIN_PARAMS = ("scale", "bias")


def cin_layers(params: Mapping[str, Any], num_modalities: int) -> dict[str, Mapping[str, Any]]:
    """Every :class:`ConditionalInstanceNorm` of a params tree: ``{module path: {"scale", "bias"}}``.

    A CIN layer is a module whose params are exactly ``scale`` and ``bias``, both of one shape ``(M, C)``
    with ``M == num_modalities``; every other norm keeps ``(C,)`` vectors. Paths join the module names
    with ``/`` (``down_0_0/unit0/norm``). The leaves may be arrays or shapes only (``jax.eval_shape``),
    so fine-tuning can find the tables of a model it has not built yet.
    """
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        params = params["params"]
    found: dict[str, Mapping[str, Any]] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if set(node) == set(CIN_PARAMS) and not any(isinstance(node[q], Mapping) for q in CIN_PARAMS):
            scale, bias = (getattr(node[q], "shape", None) for q in CIN_PARAMS)
            if scale is not None and len(scale) == 2 and scale == bias and scale[0] == num_modalities:
                found["/".join(path)] = node
            return
        for key, child in node.items():
            if isinstance(child, Mapping):
                walk(child, (*path, str(key)))

    walk(params, ())
    return found


class ConditionalInstanceNorm(nn.Module):
    """Instance norm with per-modality affine tables ``scale[M, C]`` and ``bias[M, C]``.

    ``modality`` is an int array of shape ``(B,)``. An id outside ``[0, M)`` produces NaN for that
    sample (never another modality's parameters); concrete ids are also checked eagerly.
    """

    num_modalities: int
    epsilon: float = EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        modality: jax.Array | None = None,
        train: bool = False,
        prelu_slope: jax.Array | None = None,
    ) -> jax.Array:
        """``prelu_slope``: apply PReLU with that shared slope too, fused (:func:`instance_norm_prelu`)."""
        if modality is None:
            raise ValueError(
                "ConditionalInstanceNorm needs a modality id per sample (int array of shape (B,))."
            )
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (self.num_modalities, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_modalities, c), self.param_dtype)
        modality = jnp.asarray(modality)
        if modality.shape != (x.shape[0],):
            raise ValueError(
                f"Expected one modality id per sample, shape ({x.shape[0]},); got {modality.shape}."
            )
        check_modality_ids(modality, self.num_modalities)
        valid = (modality >= 0) & (modality < self.num_modalities)
        idx = jnp.clip(modality, 0, self.num_modalities - 1)
        nan = jnp.float32(jnp.nan)
        g = jnp.where(valid[:, None], scale.astype(jnp.float32)[idx], nan)
        b = jnp.where(valid[:, None], bias.astype(jnp.float32)[idx], nan)
        return _affine_norm(x, g, b, self.epsilon, prelu_slope)


class InstanceNorm(nn.Module):
    """Instance norm over all non-batch, non-channel axes; optional per-channel affine."""

    affine: bool = False
    epsilon: float = EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        modality: jax.Array | None = None,
        train: bool = False,
        prelu_slope: jax.Array | None = None,
    ) -> jax.Array:
        """``prelu_slope``: apply PReLU with that shared slope too, fused (:func:`instance_norm_prelu`)."""
        c = x.shape[-1]
        per_sample = lambda v: jnp.broadcast_to(v.astype(jnp.float32), (x.shape[0], c))  # noqa: E731
        if not self.affine:
            if prelu_slope is None:
                return instance_normalize(x, self.epsilon).astype(x.dtype)
            ones, zeros = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
            return _affine_norm(x, per_sample(ones), per_sample(zeros), self.epsilon, prelu_slope)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return _affine_norm(x, per_sample(scale), per_sample(bias), self.epsilon, prelu_slope)


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis (PyTorch eps 1e-5), fp32 statistics."""

    affine: bool = True
    epsilon: float = EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        y = layer_normalize(x, self.epsilon)
        if self.affine:
            y = _channel_affine(self, y, self.param_dtype)
        return y.astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm (PyTorch semantics, eps 1e-5) with fp32 statistics."""

    num_groups: int = 4
    affine: bool = True
    epsilon: float = EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}.")
        xg = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean, var = _moments(xg, axes)
        y = ((xg.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if self.affine:
            y = _channel_affine(self, y, self.param_dtype)
        return y.astype(x.dtype)


class BatchNorm(nn.Module):
    """BatchNorm with running statistics in the ``batch_stats`` collection (PyTorch momentum 0.1)."""

    affine: bool = True
    epsilon: float = EPS
    momentum: float = 0.1
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        bn = nn.BatchNorm(
            use_running_average=not train,
            momentum=1.0 - self.momentum,
            epsilon=self.epsilon,
            use_scale=self.affine,
            use_bias=self.affine,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="bn",
        )
        return bn(x.astype(jnp.float32)).astype(x.dtype)


def make_norm(
    name: str,
    *,
    num_modalities: int = 2,
    affine: bool = True,
    num_groups: int = 4,
    module_name: str | None = None,
) -> nn.Module:
    """Build a norm from MI-Seg's name (``instance_cond``, ``instance``, ``layer``, ``batch``, ``group``).

    As in MI-Seg's CLI, ``affine`` defaults to True for every kind and is ignored by ``instance_cond``
    (its tables are always learned).
    """
    kw = {"name": module_name}
    if name == "instance_cond":
        return ConditionalInstanceNorm(num_modalities=num_modalities, **kw)
    if name == "instance":
        return InstanceNorm(affine=affine, **kw)
    if name == "layer":
        return LayerNorm(affine=affine, **kw)
    if name == "batch":
        return BatchNorm(affine=affine, **kw)
    if name == "group":
        return GroupNorm(num_groups=num_groups, affine=affine, **kw)
    raise ValueError(f"Unknown norm {name!r}; expected one of {NORM_NAMES}.")


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """Which norm a block builds: MI-Seg's ``name`` and the options :func:`make_norm` reads for it.

    Frozen (hashable) so a block takes one ``norm: NormSpec`` field instead of four.
    """

    name: str = "instance"
    affine: bool = True
    num_groups: int = 4
    num_modalities: int = 2

    @property
    def fuses_prelu(self) -> bool:
        """Whether the norm takes ``prelu_slope=`` (the instance norms: :func:`instance_norm_prelu`)."""
        return self.name in FUSES_PRELU

    def make(self, module_name: str | None = None) -> nn.Module:
        """The norm module, named ``module_name`` in its parent."""
        return make_norm(
            self.name,
            num_modalities=self.num_modalities,
            affine=self.affine,
            num_groups=self.num_groups,
            module_name=module_name,
        )
