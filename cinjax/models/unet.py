"""C-UNet: MI-Seg's ``unet_vanilla`` (class UNetVanilla), channels-last, with conditional encoder norms.

Structure (L = len(channels); docs/mi-seg-spec.md §2.1):

1. ``pre_conv``: k×k×k conv in → channels[0], stride strides[0], bias, no norm / activation.
2. ``down_{k}_{r}`` for level k = 0..L-2: ``num_res_units`` :class:`ResidualUnit` s with the encoder
   norm; the first maps channels[k] → channels[k+1] with stride strides[k+1].
3. ``up_{j}`` for j = 0..L-2 (bottom → top, scale s = L-2-j): nearest upsampling by strides[s+1],
   concatenation ``[skip, upsampled]``, one ResidualUnit → channels[s] with the decoder norm.
4. ``out``: 1×1×1 conv → out_channels with bias (logits, returned in float32).

The paper's C-UNet is ``encoder_norm="instance_cond"`` (per-modality affine tables) with a plain affine
instance norm in the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinjax.models.blocks.residual_unit import ResidualUnit
from cinjax.models.layers.conv import CONV_IMPLS, Conv3d
from cinjax.models.layers.norms import NORM_NAMES, NormSpec
from cinjax.models.layers.upsample import Upsampled


class UNet(nn.Module):
    """MI-Seg's ``unet_vanilla``. ``__call__(x, modality, train=False)``; x NDHWC, modality int (B,)."""

    out_channels: int
    channels: Sequence[int]
    strides: Sequence[int]
    num_res_units: int = 2
    kernel_size: int = 3
    dropout: float = 0.0
    encoder_norm: str = "instance_cond"
    decoder_norm: str = "instance"
    norm_affine: bool = True
    num_groups: int = 4
    num_modalities: int = 2
    conv_impl: str = "auto"
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.check_config()

    def check_config(self) -> None:
        """Fail at construction with a message naming the offending field."""
        channels, strides = tuple(self.channels), tuple(self.strides)
        if len(channels) < 2:
            raise ValueError(f"UNet needs at least 2 levels in `channels`, got {channels}.")
        if len(strides) != len(channels):
            raise ValueError(
                f"`strides` must have one entry per level (len(channels) = {len(channels)}, as in MI-Seg's "
                f"unet_vanilla; strides[0] belongs to the first conv), got strides={strides}."
            )
        if any(int(c) < 1 for c in channels) or any(int(s) < 1 for s in strides):
            raise ValueError(f"channels and strides must be positive, got {channels} / {strides}.")
        if self.num_res_units < 1:
            raise ValueError(f"num_res_units must be >= 1, got {self.num_res_units}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}.")
        if self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {self.out_channels}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        for field in ("encoder_norm", "decoder_norm"):
            name = getattr(self, field)
            if name not in NORM_NAMES:
                raise ValueError(f"{field}={name!r} is not a norm; expected one of {NORM_NAMES}.")
            if name == "group" and any(int(c) % self.num_groups for c in channels):
                raise ValueError(
                    f"{field}='group' needs every channel count {channels} divisible by "
                    f"num_groups={self.num_groups}."
                )
        if self.num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {self.num_modalities}.")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl={self.conv_impl!r}; expected one of {CONV_IMPLS}.")

    @property
    def total_stride(self) -> int:
        """Every spatial input size must be divisible by this (so skips and upsampled maps align)."""
        return math.prod(int(s) for s in self.strides)

    @property
    def uses_modality(self) -> bool:
        return "instance_cond" in (self.encoder_norm, self.decoder_norm)

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        self._check_input(x, modality)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        channels = [int(c) for c in self.channels]
        strides = [int(s) for s in self.strides]
        levels = len(channels)
        unit_cls = nn.remat(ResidualUnit, static_argnums=(3,)) if self.remat else ResidualUnit

        def unit(features, stride, norm, name):
            return unit_cls(
                features,
                strides=stride,
                kernel_size=self.kernel_size,
                norm=NormSpec(norm, self.norm_affine, self.num_groups, self.num_modalities),
                dropout=self.dropout,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name=name,
            )

        x = Conv3d(
            channels[0],
            kernel_size=self.kernel_size,
            strides=strides[0],
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="pre_conv",
        )(x)
        skips = [x]
        for k in range(levels - 1):
            for r in range(self.num_res_units):
                stride = strides[k + 1] if r == 0 else 1
                x = unit(channels[k + 1], stride, self.encoder_norm, f"down_{k}_{r}")(x, modality, train)
            skips.append(x)
        x = skips.pop()
        for j in range(levels - 1):
            s = levels - 2 - j
            # The unit takes [skip, upsampled] as channel blocks: neither their concatenation nor the
            # upsampled map is materialised (conv3d convolves it at low resolution).
            x = (skips.pop(), Upsampled(x, strides[s + 1]))
            x = unit(channels[s], 1, self.decoder_norm, f"up_{j}")(x, modality, train)
        x = Conv3d(
            self.out_channels,
            kernel_size=1,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="out",
        )(x)
        return x.astype(jnp.float32)

    def _check_input(self, x: jax.Array, modality: jax.Array | None) -> None:
        if x.ndim != 5:
            raise ValueError(f"UNet expects NDHWC input (B, D, H, W, C), got shape {x.shape}.")
        bad = [n for n in x.shape[1:4] if n % self.total_stride]
        if bad:
            raise ValueError(
                f"Spatial size {x.shape[1:4]} must be divisible by prod(strides) = {self.total_stride} "
                f"(strides {tuple(self.strides)}); pad or crop the input."
            )
        if self.uses_modality and modality is None:
            raise ValueError(
                "This UNet has conditional norms (instance_cond): pass a modality id per sample, "
                "an int array of shape (B,)."
            )
