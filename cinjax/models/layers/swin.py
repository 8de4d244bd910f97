"""3D Swin-Transformer ops, channels-last, numerically identical to MI-Seg (= MONAI 1.1's Swin).

Everything a Swin stage needs: window partition/reverse, the effective window rule
(:func:`get_window_size`), the relative-position index and the shifted-window region ids (numpy constants
built at trace time from static shapes, never parameters), :class:`WindowAttention`,
:class:`SwinTransformerBlock`, :class:`PatchMerging` and :class:`PatchEmbed`.

MI-Seg quirks reproduced on purpose (released weights depend on them, docs/mi-seg-spec.md §3.2):

* windows smaller than the configured one (stage size <= window on some axis) index the relative
  position table with the top-left ``n x n`` block of the full window's index, not the small
  window's own index;
* zero-padded tokens take part in attention (no padding mask); the shift mask uses -100;
* ``downsample="merging"`` (v1) concatenates the sub-grids in the order (0,0,0), (1,0,0), (0,1,0),
  (0,0,1), (1,0,1), (0,1,0), (0,0,1), (1,1,1): two are duplicated, (1,1,0) and (0,1,1) are unused;
* norms inside a stage come from a :class:`~cinjax.models.layers.norms.NormSpec`: instance norms
  (``instance`` / ``instance_cond``) normalise over the whole stage token grid per sample and
  channel, LayerNorm per token over channels.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cinjax.models.layers.attention import blocked_window_attention, resolve_attention_impl, window_attention
from cinjax.models.layers.conv import Conv3d
from cinjax.models.layers.linear import Dense
from cinjax.models.layers.norms import NormSpec

Triple = tuple[int, int, int]

# Concatenation order of the 2x2x2 sub-grids (d, h, w offsets) in patch merging.
MERGING_OFFSETS: dict[str, tuple[Triple, ...]] = {
    # MONAI <= 1.4 / MI-Seg "merging": duplicates (0,1,0) and (0,0,1).
    "merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
    "mergingv2": tuple(itertools.product(range(2), range(2), range(2))),  # type: ignore[arg-type]
}


def window_partition(x: Any, window: Sequence[int]) -> Any:
    """(B, D, H, W, C) → (B * nW, N, C); windows in (batch, d, h, w) order, tokens row-major.

    Works on numpy and JAX arrays; every spatial size must be a multiple of its window.
    """
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, window[0] * window[1] * window[2], c)


def window_reverse(windows: Any, window: Sequence[int], dims: Sequence[int]) -> Any:
    """Inverse of :func:`window_partition`: (B * nW, N, C) → (B, D, H, W, C), ``dims=(B, D, H, W)``."""
    b, d, h, w = dims
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, -1)


def get_window_size(
    size: Sequence[int], window: Sequence[int], shift: Sequence[int]
) -> tuple[Triple, Triple]:
    """Effective window and shift of a stage: an axis no longer than the window uses the whole axis
    as its window and no shift (MONAI's ``get_window_size``)."""
    use_window = list(window)
    use_shift = list(shift)
    for i, s in enumerate(size):
        if s <= window[i]:
            use_window[i] = s
            use_shift[i] = 0
    return tuple(use_window), tuple(use_shift)  # type: ignore[return-value]


@functools.cache
def relative_position_index(window: Triple) -> np.ndarray:
    """(N, N) index into the ((2w-1)^3, heads) bias table for the full window, N = prod(window)."""
    coords = np.stack(np.meshgrid(*(np.arange(w) for w in window), indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.array([w - 1 for w in window])
    rel = rel * np.array([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    index = rel.sum(-1)
    index.setflags(write=False)
    return index


@functools.cache
def window_region_ids(dims: Triple, window: Triple, shift: Triple) -> np.ndarray:
    """(nW, N) region id of every token of every window on the padded grid ``dims`` for a shifted
    window pass (MONAI's ``compute_mask`` labelling, including its slices for zero shifts)."""
    img = np.zeros((1, *dims, 1), np.int32)
    cnt = 0
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for sd in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                img[:, sd, sh, sw, :] = cnt
                cnt += 1
    ids = window_partition(img, window)[..., 0]
    ids.setflags(write=False)
    return ids


def mask_from_region_ids(ids: Any) -> Any:
    """Additive attention mask (nW, N, N): 0 within a region, -100 across regions."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    return xp.where(ids[:, None, :] != ids[:, :, None], xp.float32(-100.0), xp.float32(0.0))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm / MONAI ``DropPath``, scaled by 1/keep)."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.rate == 0.0 or not train:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
    """Linear → exact-erf GELU → dropout → Linear → dropout (MONAI ``MLPBlock``, "swin" mode)."""

    hidden: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        dense = functools.partial(Dense, dtype=self.dtype)
        drop = nn.Dropout(self.dropout)
        x = nn.gelu(dense(self.hidden, name="linear1")(x), approximate=False)
        x = drop(x, deterministic=not train)
        x = dense(c, name="linear2")(x)
        return drop(x, deterministic=not train)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Input/output (B, nW, N, C). ``window`` is the configured (full) window: the bias table has
    ``prod(2w-1)`` rows and, for smaller effective windows, the top-left ``N x N`` block of the full
    window's index is used (MI-Seg quirk). ``mask_ids`` are the optional (nW, N) region ids of a
    shifted pass (:func:`window_region_ids`): tokens of different regions get -100 added.
    """

    num_heads: int
    window: Triple = (7, 7, 7)
    qkv_bias: bool = True
    attn_dropout: float = 0.0
    dropout: float = 0.0
    dtype: Any = None
    attention_impl: str = "auto"  # plain | blocked | auto (blocked on CPU); see layers/attention.py

    @nn.compact
    def __call__(self, x: jax.Array, mask_ids: np.ndarray | None = None, train: bool = False) -> jax.Array:
        b, nw, n, c = x.shape
        heads = self.num_heads
        if c % heads:
            raise ValueError(f"WindowAttention: {c} channels are not divisible by {heads} heads.")
        hd = c // heads
        n_table = (2 * self.window[0] - 1) * (2 * self.window[1] - 1) * (2 * self.window[2] - 1)
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(stddev=0.02),
            (n_table, heads),
            jnp.float32,
        )
        full_n = self.window[0] * self.window[1] * self.window[2]
        if n > full_n:
            raise ValueError(f"WindowAttention: {n} tokens per window exceed the window {self.window}.")
        index = relative_position_index(tuple(self.window))[:n, :n].reshape(-1)
        bias = jnp.take(table, index, axis=0).reshape(n, n, heads).transpose(2, 0, 1)

        dense = functools.partial(Dense, dtype=self.dtype)
        qkv = dense(3 * c, use_bias=self.qkv_bias, name="qkv")(x).reshape(b, nw, n, 3, heads, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        mask = None if mask_ids is None else mask_from_region_ids(jnp.asarray(mask_ids))
        if train and self.attn_dropout > 0.0:  # dropout on the probabilities: the plain path only
            logits = jnp.einsum("bwnhd,bwmhd->bwhnm", q, k, preferred_element_type=jnp.float32) + bias
            if mask is not None:
                logits = logits + mask[None, :, None]
            attn = nn.Dropout(self.attn_dropout)(
                jax.nn.softmax(logits, axis=-1).astype(v.dtype), deterministic=False
            )
            out = jnp.einsum("bwhnm,bwmhd->bwnhd", attn, v)
        elif resolve_attention_impl(self.attention_impl) == "blocked":
            out = blocked_window_attention(q, k, v, bias, mask)
        else:
            out = window_attention(q, k, v, bias, mask)
        out = out.reshape(b, nw, n, c)
        out = dense(c, name="proj")(out)
        return nn.Dropout(self.dropout)(out, deterministic=not train)


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP on a (B, D, H, W, C) token grid.

    ``shift`` is the configured shift ((0,0,0) for even blocks, window//2 for odd ones); the effective
    window/shift for the grid follow :func:`get_window_size`. ``mask_ids`` are the stage's shifted
    window region ids (:func:`window_region_ids`), used only when some effective shift is non-zero.
    """

    num_heads: int
    window: Triple = (7, 7, 7)
    shift: Triple = (0, 0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    norm: NormSpec = NormSpec("layer")
    dtype: Any = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask_ids: np.ndarray | None,
        modality: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        b, d, h, w, c = x.shape
        drop_path = DropPath(self.drop_path)

        y = self.norm.make("norm1")(x, modality, train)
        window, shift = get_window_size((d, h, w), self.window, self.shift)
        pads = [(-s) % ws for s, ws in zip((d, h, w), window)]
        y = jnp.pad(y, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
        dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
        shifted = any(s > 0 for s in shift)
        if shifted:
            y = jnp.roll(y, tuple(-s for s in shift), axis=(1, 2, 3))
        n = window[0] * window[1] * window[2]
        windows = window_partition(y, window).reshape(b, -1, n, c)
        windows = WindowAttention(
            self.num_heads,
            self.window,
            self.qkv_bias,
            self.attn_dropout,
            self.dropout,
            self.dtype,
            self.attention_impl,
            name="attn",
        )(windows, mask_ids if shifted else None, train)
        y = window_reverse(windows.reshape(-1, n, c), window, (b, dp, hp, wp))
        if shifted:
            y = jnp.roll(y, shift, axis=(1, 2, 3))
        y = y[:, :d, :h, :w]
        x = x + drop_path(y, train)

        y = self.norm.make("norm2")(x, modality, train)
        y = Mlp(int(c * self.mlp_ratio), self.dropout, self.dtype, name="mlp")(y, train)
        return x + drop_path(y, train)


class PatchMerging(nn.Module):
    """2x2x2 patch merging (B, D, H, W, C) → (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C).

    Zero-pads odd sizes, concatenates the 8 sub-grids in the order of ``mode`` (see
    :data:`MERGING_OFFSETS`), normalises the 8C channels, then a bias-free Linear(8C → 2C).
    """

    mode: str = "merging"
    norm: NormSpec = NormSpec("layer")
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        if self.mode not in MERGING_OFFSETS:
            raise ValueError(f"Unknown downsample {self.mode!r}; expected one of {tuple(MERGING_OFFSETS)}.")
        _, d, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, i::2, j::2, k::2, :] for i, j, k in MERGING_OFFSETS[self.mode]], axis=-1)
        x = self.norm.make("norm")(x, modality, train)
        reduction = Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")
        return reduction(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: right-pad to a multiple of the patch, then a strided conv."""

    features: int
    patch_size: int = 2
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        pads = [(0, (-s) % p) for s in x.shape[1:4]]
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        return Conv3d(
            self.features,
            kernel_size=p,
            strides=p,
            padding=((0, 0),) * 3,
            use_bias=True,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="proj",
        )(x)
