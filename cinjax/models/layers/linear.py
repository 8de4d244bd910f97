"""Dense and PReLU layers whose parameter gradients are reduced in float32 under any compute dtype.

The gradient of a bias (or of a PReLU slope) is the transpose of a broadcast: a sum over every
position of the batch. XLA sums it in the dtype of the cotangent, so with bfloat16 activations a
conv-bias gradient of a 2x48^3 batch came out 8,320 instead of 66,477. Here the bias add and the
PReLU are computed in float32 (and the result cast back), so those sums run in float32; the matmuls
stay in the compute dtype. Parameter names and initialisation follow ``flax.linen`` (and PyTorch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` in float32, cast back to ``y``'s dtype (the bias gradient is an fp32 sum)."""
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


class Dense(nn.Module):
    """``x @ kernel + bias`` over the last axis; params ``kernel`` (in, out) and ``bias`` (out,) in fp32."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = TORCH_LINEAR_INIT
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if not self.use_bias:
            return y
        return add_bias(y, self.param("bias", self.bias_init, (self.features,), self.param_dtype))


class PReLU(nn.Module):
    """PReLU with one shared slope ``negative_slope`` (PyTorch's default ``PReLU()``, init 0.25).

    The slope is an attribute (``PReLU(name=...).negative_slope``) so that a parent can hand it to a norm
    that applies the activation itself (:func:`~cinjax.models.layers.norms.instance_norm_prelu`).
    """

    negative_slope_init: float = 0.25
    param_dtype: Any = jnp.float32

    def setup(self):
        self.negative_slope = self.param(
            "negative_slope", nn.initializers.constant(self.negative_slope_init), (), self.param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        return jnp.where(x32 >= 0, x32, self.negative_slope.astype(jnp.float32) * x32).astype(x.dtype)
