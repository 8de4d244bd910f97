"""Nearest-neighbour upsampling, eager or kept at low resolution for the conv that reads it.

A UNet decoder convolves ``upsample_nearest(u, 2)``; every 3x3x3 window of that map sees only a 2x2x2
neighbourhood of ``u``, so :func:`cinjax.models.layers.conv.conv3d` computes the same conv
from ``u`` itself with 8/27 of the multiply-adds. :class:`Upsampled` carries ``u`` and the factor to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling of the 3 spatial axes of NDHWC by an integer factor (torch semantics)."""
    if factor == 1:
        return x
    for axis in (1, 2, 3):
        x = jnp.repeat(x, factor, axis=axis)
    return x


@jax.tree_util.register_pytree_node_class
class Upsampled:
    """``upsample_nearest(low, factor)``, not materialised: :class:`~cinjax.models.layers.conv.Conv3d`
    convolves it from ``low``; anything else calls :meth:`materialize`. ``shape`` and ``dtype`` are
    those of the upsampled map."""

    def __init__(self, low: jax.Array, factor: int):
        self.low, self.factor = low, int(factor)

    @property
    def shape(self) -> tuple[int, ...]:
        b, d, h, w, c = self.low.shape
        return (b, d * self.factor, h * self.factor, w * self.factor, c)

    @property
    def dtype(self) -> jnp.dtype:
        return self.low.dtype

    def astype(self, dtype) -> Upsampled:
        return Upsampled(self.low.astype(dtype), self.factor)

    def materialize(self) -> jax.Array:
        return upsample_nearest(self.low, self.factor)

    def tree_flatten(self):
        return (self.low,), self.factor

    @classmethod
    def tree_unflatten(cls, factor, children):
        return cls(children[0], factor)


def materialize(x: jax.Array | Upsampled) -> jax.Array:
    """The array itself, or the upsampled map of an :class:`Upsampled`."""
    return x.materialize() if isinstance(x, Upsampled) else x
