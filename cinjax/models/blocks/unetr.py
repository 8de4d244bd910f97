"""MONAI's UNETR convolution blocks (as used by MI-Seg's Swin-UNETR), channels-last, pluggable norms.

* :class:`UnetResBlock`: conv3x3 → norm → LeakyReLU(0.01) → conv3x3 → norm, plus a residual
  (identity, or conv1x1 → norm when channels or stride change), then LeakyReLU. Convs have no bias.
* :class:`UnetrBasicBlock`: the ``res_block=True`` UNETR encoder block (a :class:`UnetResBlock`
  named ``layer``, mirroring MONAI's ``encoder*.layer.*`` keys).
* :class:`UnetrUpBlock`: kernel-2 stride-2 transposed conv, concat [upsampled, skip], UnetResBlock.
* :class:`UnetOutBlock`: 1x1x1 conv with bias (logits).

The transposed conv is computed as a 1x1x1 conv to ``8 * C_out`` channels followed by a
depth-to-space reshape, which is exactly a kernel-2 stride-2 padding-0 transposed conv (each input
voxel writes one disjoint 2x2x2 output block) and avoids JAX's slow transposed-conv gradients. Its
kernel is stored as ``transp_conv/kernel`` of shape (1, 1, 1, C_in, 8 * C_out) with output channels
ordered (a, b, c, o) for the output offset (a, b, c) along (D, H, W) and output channel o; a PyTorch
ConvTranspose3d weight ``W`` (C_in, C_out, 2, 2, 2) converts as
``W.transpose(0, 2, 3, 4, 1).reshape(C_in, 8 * C_out)[None, None, None]``
(:func:`transposed_kernel_from_torch`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cinjax.models.layers.conv import Conv3d
from cinjax.models.layers.norms import NormSpec

LEAKY_SLOPE = 0.01


def transposed_kernel_from_torch(w: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose3d weight (C_in, C_out, 2, 2, 2) → our (1, 1, 1, C_in, 8 * C_out) kernel."""
    w = np.asarray(w)
    if w.ndim != 5 or w.shape[2:] != (2, 2, 2):
        raise ValueError(f"Expected a (C_in, C_out, 2, 2, 2) transposed-conv weight, got {w.shape}.")
    c_in, c_out = w.shape[:2]
    return np.transpose(w, (0, 2, 3, 4, 1)).reshape(1, 1, 1, c_in, 8 * c_out)


def depth_to_space(x: jax.Array, features: int) -> jax.Array:
    """(B, D, H, W, 8F) with channels ordered (a, b, c, f) → (B, 2D, 2H, 2W, F)."""
    b, d, h, w, _ = x.shape
    x = x.reshape(b, d, h, w, 2, 2, 2, features)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, 2 * d, 2 * h, 2 * w, features)


class UnetResBlock(nn.Module):
    """MONAI ``UnetResBlock`` (params ``conv1..3``, ``norm1..3``; ``conv3``/``norm3`` only when the
    channel count or stride changes)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    norm: NormSpec = NormSpec("instance")
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        conv = functools.partial(
            Conv3d, self.features, use_bias=False, conv_impl=self.conv_impl, dtype=self.dtype
        )
        k = self.kernel_size
        pad = ((k - self.stride + 1) // 2,) * 2  # MONAI get_padding
        y = conv(kernel_size=k, strides=self.stride, padding=(pad,) * 3, name="conv1")(x)
        y = nn.leaky_relu(self.norm.make("norm1")(y, modality, train), LEAKY_SLOPE)
        y = conv(kernel_size=k, name="conv2")(y)
        y = self.norm.make("norm2")(y, modality, train)
        residual = x
        if x.shape[-1] != self.features or self.stride != 1:
            residual = conv(kernel_size=1, strides=self.stride, padding=((0, 0),) * 3, name="conv3")(x)
            residual = self.norm.make("norm3")(residual, modality, train)
        return nn.leaky_relu(y + residual.astype(y.dtype), LEAKY_SLOPE)


class UnetrBasicBlock(UnetResBlock):
    """MONAI ``UnetrBasicBlock(res_block=True)``: a :class:`UnetResBlock` (same fields) whose params
    sit under ``layer``, mirroring MONAI's ``encoder*.layer.*`` keys."""

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        return UnetResBlock(
            self.features,
            self.kernel_size,
            self.stride,
            self.norm,
            self.conv_impl,
            self.dtype,
            name="layer",
        )(x, modality, train)


class UnetrUpBlock(nn.Module):
    """MONAI ``UnetrUpBlock(res_block=True, upsample_kernel_size=2)``: upsample x2, concat the skip
    (upsampled first), then a :class:`UnetResBlock` (2F → F) under ``conv_block``."""

    features: int
    kernel_size: int = 3
    norm: NormSpec = NormSpec("instance")
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array, skip: jax.Array, modality: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        up = Conv3d(
            8 * self.features,
            kernel_size=1,
            padding=((0, 0),) * 3,
            use_bias=False,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="transp_conv",
        )(x)
        up = depth_to_space(up, self.features)
        if up.shape[1:4] != skip.shape[1:4]:
            raise ValueError(f"UnetrUpBlock: upsampled shape {up.shape} does not match skip {skip.shape}.")
        y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
        return UnetResBlock(
            self.features,
            self.kernel_size,
            norm=self.norm,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="conv_block",
        )(y, modality, train)


class UnetOutBlock(nn.Module):
    """1x1x1 conv with bias (MONAI ``UnetOutBlock``; param path ``conv``)."""

    features: int
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv3d(
            self.features,
            kernel_size=1,
            padding=((0, 0),) * 3,
            use_bias=True,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="conv",
        )(x)
