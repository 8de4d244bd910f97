"""MONAI-style ``Convolution`` (conv → ADN) and ``ResidualUnit`` as used by MI-Seg's ``unet_vanilla``.

MI-Seg copies MONAI 1.1's blocks and threads a per-sample modality id through them. With MI-Seg's
settings (``adn_ordering="NDA"``, ``act="prelu"``) a :class:`Convolution` is

    conv (kernel k, stride s, padding (k-1)//2, bias) → norm → dropout → PReLU (one shared slope, 0.25)

and a :class:`ResidualUnit` is two such sub-units (the first carries the stride and the channel change)
plus a residual branch: identity when stride and channels are unchanged, a 1×1×1 conv when only the
channels change, a k×k×k conv with the unit's stride otherwise; output = main + residual. A unit's input
may be a sequence of channel blocks, an upsampled one among them (see
:class:`~cinjax.models.layers.conv.Conv3d`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinjax.models.layers.conv import Conv3d
from cinjax.models.layers.linear import PReLU
from cinjax.models.layers.norms import NormSpec
from cinjax.models.layers.upsample import materialize


class Convolution(nn.Module):
    """conv → norm → dropout → PReLU (MONAI ``Convolution`` with ADN ordering ``NDA``).

    Without dropout an instance norm applies the PReLU itself (one custom VJP: a pass fewer over the
    activations each way); the parameters are the same either way.
    """

    features: int
    strides: int = 1
    kernel_size: int = 3
    norm: NormSpec = NormSpec("instance")
    dropout: float = 0.0
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array | Sequence[jax.Array], modality: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        x = Conv3d(
            self.features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            use_bias=True,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="conv",
        )(x)
        norm, act = self.norm.make("norm"), PReLU(negative_slope_init=0.25, name="act")
        if self.dropout == 0.0 and self.norm.fuses_prelu:
            return norm(x, modality, train, prelu_slope=act.negative_slope)  # one pass fewer each way
        x = norm(x, modality, train)
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return act(x)


class ResidualUnit(nn.Module):
    """Two :class:`Convolution` sub-units plus a residual branch (MONAI ``ResidualUnit``, subunits=2)."""

    features: int
    strides: int = 1
    kernel_size: int = 3
    subunits: int = 2
    norm: NormSpec = NormSpec("instance")
    dropout: float = 0.0
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array | Sequence[jax.Array], modality: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        residual = x
        y = x
        for u in range(self.subunits):
            y = Convolution(
                self.features,
                strides=self.strides if u == 0 else 1,
                kernel_size=self.kernel_size,
                norm=self.norm,
                dropout=self.dropout,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name=f"unit{u}",
            )(y, modality, train)
        in_features = sum(p.shape[-1] for p in x) if isinstance(x, (list, tuple)) else x.shape[-1]
        if self.strides != 1 or in_features != self.features:
            # Only the channels change → 1x1x1 conv; a stride → k^3 conv with the same stride (MONAI).
            k = self.kernel_size if self.strides != 1 else 1
            residual = Conv3d(
                self.features,
                kernel_size=k,
                strides=self.strides,
                use_bias=True,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name="residual",
            )(x)
        elif isinstance(residual, (list, tuple)):
            residual = jnp.concatenate([materialize(p) for p in residual], axis=-1)
        return y + residual.astype(y.dtype)
