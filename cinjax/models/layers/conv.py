"""The one 3D convolution helper of cinjax, with a selectable lowering.

Every 3D convolution of every model goes through :func:`conv3d` (or the :class:`Conv3d` module), so
the lowering can be chosen per platform:

* ``"lax"``: ``lax.conv_general_dilated`` on NDHWC (cuDNN's 3D conv on GPU).
* ``"depth2d"``: the 3D conv as a sum over depth offsets of 2D convs on (B*D, H, W, C) slices, gradients
  by autodiff. Exactly the same maths; XLA's CPU backend runs its forward and input gradient 3-4x faster
  than its 3D conv, but the kernel gradient slower: XLA computes it as a convolution with the batch as
  the contraction dim, transposing every input slice to put B*D innermost (~300 ms per 50 MB tensor on
  a 2-core CPU). The input gradient of a conv strided in-plane is one stride-1 2D conv per output phase
  (:func:`conv2d_input_grad_phases`) instead of XLA's generic input-dilated conv.
* ``"cpu"``: ``"depth2d"``'s forward and input gradient, and a kernel gradient as cache-blocked im2col
  matmuls (:func:`kernel_grad_blocked`): one depth plane and a band of rows at a time, so the patches
  stay in cache and no tensor is transposed (~6x faster than either autodiff kernel gradient).
* ``"auto"``: ``"cpu"`` on CPU, ``"lax"`` elsewhere.

Two things shape the depth-sliced 2D convs on XLA:CPU: it runs a 2D conv with at most 16 input and 16
output channels on Eigen (slow when narrow) and a wider one on YNNPACK, and YNNPACK slows 2-4x per
plane once its operands outgrow the last-level cache. So narrow convs convolve their depth offsets as
one stacked 2D conv (:func:`stacks_depth_offsets`), big YNNPACK convs run a chunk of depth planes at a
time (:func:`chunks_depth`), and where either applies the input gradient of a stride-1 conv is the conv
of the output gradient with the flipped kernel. :func:`conv3d` convolves a nearest-upsampled map (a
UNet decoder's :class:`~cinjax.models.layers.upsample.Upsampled`) at its low resolution, on every lowering.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cinjax.models.layers.linear import add_bias
from cinjax.models.layers.upsample import Upsampled, upsample_nearest
from cinjax.shapes import triple

CONV_IMPLS = ("lax", "depth2d", "cpu", "auto")
Padding = Sequence[tuple[int, int]]

_DN = ("NDHWC", "DHWIO", "NDHWC")


def resolve_conv_impl(impl: str) -> str:
    """Map ``"auto"`` to the fast lowering of the default backend; validate the name."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}.")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "lax"
    return impl


def same_padding(kernel_size: int | Sequence[int]) -> tuple[tuple[int, int], ...]:
    """PyTorch/MONAI ``padding=(k-1)//2`` on both sides (odd kernels)."""
    return tuple(((k - 1) // 2, (k - 1) // 2) for k in triple(kernel_size, "kernel_size"))


def conv3d(
    x: jax.Array | Upsampled,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding | None = None,
    impl: str = "auto",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """3D convolution, NDHWC input, DHWIO kernel, explicit (lo, hi) padding per spatial axis.

    ``padding=None`` means PyTorch-style symmetric ``(k-1)//2``. The result does not depend on
    ``impl`` beyond float summation order. An :class:`~cinjax.models.layers.upsample.Upsampled` input
    is convolved at its low resolution where that folds (:func:`_conv3d_of_upsampled`).
    """
    strides = triple(strides, "strides")
    kd, kh, kw = kernel.shape[:3]
    padding = tuple(tuple(p) for p in (padding if padding is not None else same_padding((kd, kh, kw))))
    if isinstance(x, Upsampled):
        return _conv3d_of_upsampled(x, kernel, strides, padding, impl, precision)
    impl = resolve_conv_impl(impl)
    if (kd, kh, kw) == (1, 1, 1) and strides == (1, 1, 1) and padding == ((0, 0),) * 3:
        return jnp.einsum("bdhwi,io->bdhwo", x, kernel[0, 0, 0], precision=precision)
    if impl == "lax":
        return lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=_DN, precision=precision
        )
    if impl == "cpu":
        return _conv3d_cpu(x, kernel, strides, padding, precision)
    return _conv3d_depth2d(x, kernel, strides, padding, precision)


# Per axis and output phase p of a 2x nearest upsampling, the weight of each of the 3 taps on the two
# low-resolution rows that phase reads: rows m-1, m for p = 0 (taps 0 | 1 + 2), rows m, m+1 for p = 1
# (taps 0 + 1 | 2). Indexed [p, low-resolution row, tap].
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def folds_upsample(kernel_size: Sequence[int], strides: Sequence[int], padding: Padding, factor: int) -> bool:
    """Whether :func:`conv3d` convolves an upsampled input at low resolution: a 2x upsampled input, stride 1,
    and a 3x3x3 kernel with padding 1 or a 1x1x1 one (a UNet decoder's convs); otherwise it upsamples."""
    kernel_size, strides = tuple(kernel_size), tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    same3 = kernel_size == (3, 3, 3) and padding == ((1, 1),) * 3
    pointwise = kernel_size == (1, 1, 1) and padding == ((0, 0),) * 3
    return factor == 2 and strides == (1, 1, 1) and (same3 or pointwise)


def _conv3d_of_upsampled(x: Upsampled, kernel, strides, padding, impl, precision) -> jax.Array:
    """``conv3d(x.materialize(), kernel, ...)`` computed from the low-resolution map where it folds.

    Output voxel ``2m + p`` (per axis) of a 3-tap conv over a 2x nearest-upsampled map reads only rows
    ``m - 1 + p`` and ``m + p`` of the low-resolution map ``u``, with the taps summed as ``_PHASE_TAPS``
    says. So all 8 output phases are one 2x2x2 VALID conv of ``u`` zero-padded by 1, with the 8 phase
    kernels side by side along the outputs; phase ``(p, q, r)`` is its output shifted by ``(p, q, r)``,
    and the phases interleave into the result. 8 taps per output voxel instead of 27, and the upsampled
    map is never built. A 1x1x1 conv commutes with the upsampling. Equal up to float summation order.
    """
    kernel_size = tuple(kernel.shape[:3])
    if not folds_upsample(kernel_size, strides, padding, x.factor):
        return conv3d(
            x.materialize(), kernel, strides=strides, padding=padding, impl=impl, precision=precision
        )
    u = x.low
    if kernel_size == (1, 1, 1):
        return upsample_nearest(conv3d(u, kernel, padding=padding, impl=impl, precision=precision), 2)
    b, md, mh, mw, ci = u.shape
    co = kernel.shape[-1]
    taps = jnp.asarray(_PHASE_TAPS)
    phase_kernels = jnp.einsum(
        "pas,qbt,rcv,stvio->abcipqro", taps, taps, taps, kernel.astype(jnp.float32), precision="highest"
    )
    phase_kernels = phase_kernels.reshape(2, 2, 2, ci, 8 * co).astype(kernel.dtype)
    padded = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    y = conv3d(padded, phase_kernels, padding=((0, 0),) * 3, impl=impl, precision=precision)
    y = y.reshape(b, md + 1, mh + 1, mw + 1, 2, 2, 2, co)

    def phase(p, q, r):
        return y[:, p : p + md, q : q + mh, r : r + mw, p, q, r]

    # (b, md, 2, mh, 2, mw, 2, co): output voxel (2m + p, 2n + q, 2l + r) is phase (p, q, r) at (m, n, l).
    out = jnp.stack(
        [jnp.stack([jnp.stack([phase(p, q, r) for r in (0, 1)], 4) for q in (0, 1)], 3) for p in (0, 1)], 2
    )
    return out.reshape(b, 2 * md, 2 * mh, 2 * mw, co)


def stacks_depth_offsets(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the forward of the ``"cpu"`` lowering convolves all depth offsets at once: one 2D conv
    with the offsets' kernels side by side along the output channels, then the shifted sum.

    Done for depth stride 1 and at most 8 output channels. XLA:CPU runs 2D convs with at most 16 input
    and 16 output channels on Eigen, slowly when they are narrow, and wider ones on YNNPACK; the stacked
    conv has ``kd * co`` outputs and takes the fast path. Measured on 2-core x86, 64^3, batch 1: 1 -> 8
    channels 29 -> 6.5 ms, 8 -> 8 27 -> 17 ms, 16 -> 8 47 -> 29 ms; 16 outputs gain nothing.
    """
    return strides[0] == 1 and kernel_shape[0] > 1 and kernel_shape[-1] <= 8


def _conv3d_depth2d(x, kernel, strides, padding, precision, stack_offsets=None):
    """Sum over depth offsets ``a`` of 2D convs of depth slices (one (B*D', H, W, C) batch each).

    Stride 1 along depth: every offset convolves the whole unpadded input (no copy of it) and each
    output is added, shifted along depth, into the slices of the centre offset's output in place (the
    border slices a shift drops are the only extra work; zero-padding the shifted outputs and summing
    them instead cost XLA:CPU two more full passes per conv). The offsets are one 2D conv with their
    kernels side by side along the output channels where :func:`stacks_depth_offsets` says so
    (``stack_offsets=None``), or as ``stack_offsets`` says. A depth stride convolves the strided slices
    ``a, a+s, a+2s, ...`` of the padded input instead.
    """
    b, d, h, w, c = x.shape
    kd = kernel.shape[0]
    sd = strides[0]
    (pd_lo, pd_hi), pad_h, pad_w = padding
    d_out = (d + pd_lo + pd_hi - kd) // sd + 1

    def conv2d(slices, k):
        n = slices.shape[0] * slices.shape[1]
        y = _conv2d(slices.reshape(n, *slices.shape[2:]), k, tuple(strides[1:]), (pad_h, pad_w), precision)
        return y.reshape(slices.shape[0], slices.shape[1], *y.shape[1:])

    if sd == 1:
        # out[o] += y_a[o + a - pd_lo] wherever that input slice exists (zero padding elsewhere).
        if stack_offsets is None:
            stack_offsets = stacks_depth_offsets(kernel.shape, strides)
        stack_offsets = stack_offsets and kd > 1
        if kd > 1 and chunks_depth(x.shape, kernel.shape, strides, padding, stack_offsets):
            return _conv3d_by_depth_chunks(x, kernel, strides, padding, precision, stack_offsets)
        if stack_offsets:
            co = kernel.shape[-1]
            y = conv2d(x, jnp.concatenate(list(kernel), axis=-1))
            ys = [y[..., a * co : (a + 1) * co] for a in range(kd)]
        else:
            ys = [conv2d(x, kernel[a]) for a in range(kd)]
        centre = pd_lo if 0 <= pd_lo < kd and d_out == d else None
        out = ys[centre] if centre is not None else jnp.zeros((b, d_out, *ys[0].shape[2:]), ys[0].dtype)
        for a in range(kd):
            lo = a - pd_lo
            start, stop = max(lo, 0), min(lo + d_out, d)
            if a != centre and stop > start:
                out = out.at[:, start - lo : stop - lo].add(ys[a][:, start:stop])
        return out
    xp = jnp.pad(x, ((0, 0), (pd_lo, pd_hi), (0, 0), (0, 0), (0, 0)))
    out = None
    for a in range(kd):
        y = conv2d(lax.slice_in_dim(xp, a, a + sd * (d_out - 1) + 1, stride=sd, axis=1), kernel[a])
        out = y if out is None else out + y
    return out


# Depth-stride-1 convs whose 2D convs read and write more than DEPTH_CHUNK_MIN_BYTES run a chunk of
# output planes at a time, each chunk's 2D-conv output about DEPTH_CHUNK_BYTES.
DEPTH_CHUNK_MIN_BYTES = 24 << 20
DEPTH_CHUNK_BYTES = 4 << 20


def _out_hw(shape, kernel_shape, strides, padding) -> tuple[int, int]:
    """Height and width of the conv's output."""
    return tuple(
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(shape[2:4], kernel_shape[1:3], strides[1:], padding[1:])
    )


def chunks_depth(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Padding,
    stack_offsets: bool = False,
) -> bool:
    """Whether :func:`_conv3d_depth2d` runs this depth-stride-1 conv in chunks of output planes: when its
    2D convs run on YNNPACK (XLA:CPU's choice for more than 16 input or output channels; the stacked
    conv has ``kd * co`` outputs) and their input and output, all depth offsets, exceed
    ``DEPTH_CHUNK_MIN_BYTES`` in fp32. YNNPACK's 2D convs run 2-4x slower per plane once their operands
    outgrow the last-level cache (2-core x86, 32 MB L3: 1 -> 24 channels at 64^2, 0.09 ms per plane up to
    64 planes, 0.29-0.39 ms beyond); chunks in sequence keep each one's operands in cache. Eigen's narrow
    convs do not gain (C-Swin-UNETR's 12 -> 12 at 64^3: its step 12 % slower in chunks)."""
    b, d, h, w, ci = x_shape
    kd, co = kernel_shape[0], kernel_shape[-1]
    oh, ow = _out_hw(x_shape, kernel_shape, strides, padding)
    on_ynnpack = ci > 16 or (kd * co if stack_offsets else co) > 16
    total = b * d * (h * w * ci + oh * ow * kd * co) * 4
    return strides[0] == 1 and kd > 1 and on_ynnpack and total > DEPTH_CHUNK_MIN_BYTES


def _conv3d_by_depth_chunks(x, kernel, strides, padding, precision, stack_offsets):
    """Depth stride 1, ``c`` output planes at a time (``lax.map`` over samples and chunks, in sequence).

    Output plane ``o`` is ``sum_a conv2d(xpad[o + a], kernel[a])`` over the depth-padded input, so a
    chunk reads ``c + kd - 1`` input planes; with ``stack_offsets`` its offsets are one 2D conv with the
    kernels side by side along the outputs. ``c`` is a divisor of the output depth near the
    ``DEPTH_CHUNK_BYTES`` budget where one exists, else the budget with zero planes at the end, cropped.
    """
    b, d, h, w, ci = x.shape
    kd, co = kernel.shape[0], kernel.shape[-1]
    (pd_lo, pd_hi), pad_h, pad_w = padding
    d_out = d + pd_lo + pd_hi - kd + 1
    oh, ow = _out_hw(x.shape, kernel.shape, strides, padding)
    budget = max(4, DEPTH_CHUNK_BYTES // (oh * ow * kd * co * jnp.dtype(x.dtype).itemsize))
    c = min(d_out, budget)
    c = max([n for n in range(-(-c // 2), c + 1) if d_out % n == 0] or [c])
    chunks = -(-d_out // c)
    xp = jnp.pad(x, ((0, 0), (pd_lo, pd_hi + chunks * c - d_out), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate(list(kernel), axis=-1) if stack_offsets else None
    in_strides, in_padding = tuple(strides[1:]), (pad_h, pad_w)

    def chunk(index):
        sample = lax.dynamic_index_in_dim(xp, index // chunks, 0, keepdims=False)
        planes = lax.dynamic_slice_in_dim(sample, (index % chunks) * c, c + kd - 1, axis=0)
        if stack_offsets:
            y = _conv2d(planes, stacked, in_strides, in_padding, precision)
            return sum(y[a : a + c, ..., a * co : (a + 1) * co] for a in range(kd))
        return sum(
            _conv2d(planes[a : a + c], kernel[a], in_strides, in_padding, precision) for a in range(kd)
        )

    out = lax.map(chunk, jnp.arange(b * chunks)).reshape(b, chunks * c, oh, ow, co)
    return out[:, :d_out] if chunks * c != d_out else out


_DN2 = ("NHWC", "HWIO", "NHWC")


def _lax_conv2d(x, k, strides, padding, precision):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN2, precision=precision)


def _conv2d(x, k, strides, padding, precision):
    """2D conv (NHWC, HWIO) of the depth-sliced lowering; strided convs get :func:`_conv2d_phased`'s
    input gradient where it applies."""
    if strides != (1, 1) and _phases_apply(x.shape[1:3], strides):
        return _conv2d_phased(x, k, strides, tuple(tuple(p) for p in padding), precision)
    return _lax_conv2d(x, k, strides, padding, precision)


def _phases_apply(in_hw, strides) -> bool:
    return all(n % s == 0 for n, s in zip(in_hw, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d_phased(x, k, strides, padding, precision):
    return _lax_conv2d(x, k, strides, padding, precision)


def _conv2d_phased_fwd(x, k, strides, padding, precision):
    return _conv2d_phased(x, k, strides, padding, precision), (x, k)


def _conv2d_phased_bwd(strides, padding, precision, residuals, dy):
    x, k = residuals
    _, kernel_vjp = jax.vjp(lambda w: _lax_conv2d(x, w, strides, padding, precision), k)
    dx = conv2d_input_grad_phases(dy, k, strides, padding, x.shape[1:3], precision)
    return dx.astype(x.dtype), kernel_vjp(dy)[0]


_conv2d_phased.defvjp(_conv2d_phased_fwd, _conv2d_phased_bwd)


def conv2d_input_grad_phases(
    dy: jax.Array,
    k: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    in_hw: tuple[int, int],
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The input gradient of a strided 2D conv (NHWC, HWIO) as one stride-1 conv per output phase.

    Input row ``i = s*m + p`` receives ``dy[o] @ k[t]^T`` from the taps ``t`` with ``s*o - lo + t = i``,
    i.e. ``(p + lo - t) % s == 0`` and ``o = m + (p + lo - t) // s``: for each phase ``(p, q)`` that is a
    stride-1 conv of ``dy`` with those taps (flipped, in and out channels swapped), and the ``sh*sw``
    phase maps interleave into ``dx``. XLA:CPU computes the same gradient as a generic input-dilated conv,
    3-4x slower on the C-UNet's 64^3 stride-2 convs; these stride-1 convs take its fast path. Needs the
    input size divisible by the stride (:func:`_phases_apply`).
    """
    kh, kw, ci, _ = k.shape
    n, oh, ow, _ = dy.shape
    (sh, sw), (h, w) = strides, in_hw
    mh, mw = h // sh, w // sw
    phases = []
    for p in range(sh):
        row = []
        for q in range(sw):
            taps_h = [t for t in range(kh) if (p + padding[0][0] - t) % sh == 0]
            taps_w = [t for t in range(kw) if (q + padding[1][0] - t) % sw == 0]
            if not taps_h or not taps_w:
                row.append(jnp.zeros((n, mh, mw, ci), dy.dtype))
                continue
            # Ascending dy offsets are descending taps: flip them, and swap in / out channels.
            sub = k[taps_h[0] : taps_h[-1] + 1 : sh, taps_w[0] : taps_w[-1] + 1 : sw]
            sub = jnp.swapaxes(sub[::-1, ::-1], 2, 3)
            lo_h = (p + padding[0][0] - taps_h[-1]) // sh
            lo_w = (q + padding[1][0] - taps_w[-1]) // sw
            # dy rows lo_h .. lo_h + mh + len(taps_h) - 2 (zero outside [0, oh)), likewise columns;
            # cut and zero-padded explicitly (XLA:CPU's conv gave garbage for some negative paddings).
            window = _zero_extended(dy, (lo_h, lo_w), (mh + len(taps_h) - 1, mw + len(taps_w) - 1))
            row.append(_lax_conv2d(window, sub, (1, 1), "VALID", precision))
        phases.append(jnp.stack(row, axis=3))
    return jnp.stack(phases, axis=2).reshape(n, h, w, ci)


def _zero_extended(x: jax.Array, start: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """Rows ``start[0] .. start[0] + size[0] - 1`` and likewise columns of NHWC ``x``, zero outside it."""
    pads, cuts = [(0, 0)], [slice(None)]
    for axis, (lo, n) in enumerate(zip(start, size), start=1):
        stop, extent = lo + n, x.shape[axis]
        pads.append((max(-lo, 0), max(stop - extent, 0)))
        cuts.append(slice(max(lo, 0), min(stop, extent)))
    return jnp.pad(x[tuple(cuts)], (*pads, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv3d_cpu(x, kernel, strides, padding, precision):
    return _conv3d_depth2d(x, kernel, strides, padding, precision)


def _conv3d_cpu_fwd(x, kernel, strides, padding, precision):
    return _conv3d_depth2d(x, kernel, strides, padding, precision), (x, kernel)


def _conv3d_cpu_bwd(strides, padding, precision, residuals, dy):
    x, kernel = residuals
    dkernel = kernel_grad_blocked(x, dy, kernel.shape[:3], strides, padding).astype(kernel.dtype)
    return _conv3d_cpu_input_grad(x, kernel, dy, strides, padding, precision), dkernel


def _conv3d_cpu_input_grad(x, kernel, dy, strides, padding, precision):
    """``dL/dx``: for a stride-1 conv, where it then stacks its depth offsets (at most 8 input channels)
    or runs in depth chunks, the conv of ``dy`` with the flipped kernel (in and out channels swapped;
    64^3, batch 2, 8 -> 8 channels: 81 -> 56 ms on 2-core x86); otherwise autodiff of the unstacked
    forward."""
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    flipped_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:3], padding))
    if (
        tuple(strides) == (1, 1, 1)
        and min(min(p) for p in flipped_padding) >= 0
        and (
            stacks_depth_offsets(flipped.shape, strides)
            or chunks_depth(dy.shape, flipped.shape, strides, flipped_padding, False)
        )
    ):
        return _conv3d_depth2d(dy, flipped, strides, flipped_padding, precision).astype(x.dtype)
    _, input_vjp = jax.vjp(lambda v: _conv3d_depth2d(v, kernel, strides, padding, precision, False), x)
    return input_vjp(dy)[0]


_conv3d_cpu.defvjp(_conv3d_cpu_fwd, _conv3d_cpu_bwd)

# Bytes of im2col patches per block of :func:`kernel_grad_blocked`: about a core's L2 cache.
PATCH_BLOCK_BYTES = 1 << 20
PATCHES = ("auto", "input", "input_plane", "output_grad")


def kernel_grad_blocked(
    x: jax.Array,
    dy: jax.Array,
    kernel_size: tuple[int, int, int],
    strides: tuple[int, int, int],
    padding: Padding,
    patches: str = "auto",
) -> jax.Array:
    """The kernel gradient ``dL/dW`` (DHWIO, fp32) of :func:`conv3d` from its input ``x`` and output
    gradient ``dy``.

    ``dW[a, b, c] = sum over (n, d, h, w) of xpad[n, d*sd + a, h*sh + b, w*sw + c]^T dy[n, d, h, w]``,
    computed block by block (one depth plane and a band of rows at a time, so the im2col patches stay in
    cache) as fp32 matmuls accumulated by a ``lax.scan``. The patches are the operand whose windows are
    copied side by side, once per block:

    * ``"input"``: the ``kd*kh*kw`` windows of the input (any strides).
    * ``"input_plane"``: the ``kh*kw`` in-plane windows of one input plane, against the ``kd`` output
      gradient planes that plane meets, side by side along channels (depth stride 1 only): one matmul
      per block with ``kd*co`` rows instead of ``co``, and ``kh*kw*ci + kd*co`` values copied per
      position.
    * ``"output_grad"``: the ``kh*kw`` in-plane windows of the zero-padded output gradient, against the
      ``kd`` input planes as they lie (height and width stride 1 only). ``kh*kw*co + kd*ci`` values are
      copied per position instead of ``kd*kh*kw*ci``.
    * ``"auto"``: what measured fastest on 2-core x86 CPUs: ``"output_grad"`` for stride 1 in-plane, at
      least 16 input channels, no more output channels than input channels and planes of 16+ rows
      (16 -> 8 channels at 64^3: 2-2.5x faster than ``"input"``); ``"input_plane"`` for depth stride 1,
      fewer than 16 input and at most 16 output channels (batch 2 at 64^3: 8 -> 8 channels 45-53 ->
      33-42 ms, 12 -> 12 132 -> 95 ms, 1 -> 8 28 -> 19 ms; wider outputs lose: the decoder's folded
      16 -> 64 conv 13.5 -> 34 ms); else ``"input"``. All are tested equal to autodiff.
    """
    if patches not in PATCHES:
        raise ValueError(f"Unknown patches {patches!r}; expected one of {PATCHES}.")
    ci, co, oh = x.shape[-1], dy.shape[-1], dy.shape[2]
    in_plane_stride_1 = tuple(strides[1:]) == (1, 1)
    if patches == "output_grad" and not in_plane_stride_1:
        raise ValueError(f"patches='output_grad' needs height and width stride 1, got strides {strides}.")
    if patches == "input_plane" and strides[0] != 1:
        raise ValueError(f"patches='input_plane' needs depth stride 1, got strides {strides}.")
    if patches == "auto":
        if in_plane_stride_1 and ci >= 16 and co <= ci and oh >= 16:
            patches = "output_grad"
        elif strides[0] == 1 and ci < 16 and co <= 16:
            patches = "input_plane"
        else:
            patches = "input"
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    if patches == "input":
        return _kernel_grad_input_patches(xp, dy, kernel_size, strides)
    if patches == "input_plane":
        return _kernel_grad_input_plane_patches(xp, dy, kernel_size, strides[1:])
    return _kernel_grad_output_grad_patches(xp, dy, kernel_size, strides[0])


def _rows_per_block(rows: int, row_bytes: int) -> int:
    """The largest divisor of ``rows`` whose band of patches fits in ``PATCH_BLOCK_BYTES`` (at least 1)."""
    return max([r for r in range(1, rows + 1) if rows % r == 0 and r * row_bytes <= PATCH_BLOCK_BYTES] or [1])


_CONTRACT_ROWS = (((0,), (0,)), ((), ()))


def _kernel_grad_input_patches(xp, dy, kernel_size, strides):
    """Input windows as patches: per block the input slab it reads is cut once and its ``kd*kh*kw``
    windows are stacked along channels, then ``dy_block^T @ patches``. The patches are the right-hand
    side with their rows as the contraction, the layout the matmul reads directly (on the left XLA
    copied each block into a transposed layout first). One slab and static windows compile ~3x faster
    than a dynamic slice per window, at the same speed."""
    (kd, kh, kw), (sd, sh, sw) = kernel_size, strides
    n, od, oh, ow, co = dy.shape
    ci = xp.shape[-1]
    rows = _rows_per_block(oh, ow * kd * kh * kw * ci * xp.dtype.itemsize)
    blocks = oh // rows
    in_rows = sh * (rows - 1) + kh

    def block(acc, index):
        b, d, r = index // (od * blocks), (index // blocks) % od, index % blocks
        g = lax.dynamic_slice(dy, (b, d, r * rows, 0, 0), (1, 1, rows, ow, co)).reshape(rows * ow, co)
        slab = lax.dynamic_slice(xp, (b, d * sd, r * rows * sh, 0, 0), (1, kd, in_rows, xp.shape[3], ci))[0]
        cols = jnp.concatenate(
            [
                lax.slice(
                    slab,
                    (a, i, j, 0),
                    (a + 1, i + sh * (rows - 1) + 1, j + sw * (ow - 1) + 1, ci),
                    (1, sh, sw, 1),
                )[0]
                for a in range(kd)
                for i in range(kh)
                for j in range(kw)
            ],
            axis=-1,
        )
        return acc + lax.dot_general(
            g, cols.reshape(rows * ow, -1), _CONTRACT_ROWS, preferred_element_type=jnp.float32
        ), None

    acc = jnp.zeros((co, kd * kh * kw * ci), jnp.float32)
    acc, _ = lax.scan(block, acc, jnp.arange(n * od * blocks))
    return acc.T.reshape(kd, kh, kw, ci, co)


def _kernel_grad_input_plane_patches(xp, dy, kernel_size, in_plane_strides):
    """In-plane input windows as patches (depth stride 1).

    With ``e = d + a`` the sum runs over the padded input's planes: ``dW[a, b, c] = sum xpad[n, e,
    h*sh + b, w*sw + c]^T dy[n, e - a, h, w]`` (zero outside ``dy``). Per block of rows of input plane
    ``e``, its ``kh*kw`` windows are stacked along channels, and the output-gradient planes ``e - a``
    for all ``a`` (``dy`` zero-padded by ``kd - 1`` in depth) side by side along channels: one
    ``(kd*co, kh*kw*ci)`` matmul per block.
    """
    (kd, kh, kw), (sh, sw) = kernel_size, in_plane_strides
    n, od, oh, ow, co = dy.shape
    _, dp, _, wp, ci = xp.shape
    dyp = jnp.pad(dy, ((0, 0), (kd - 1, kd - 1), (0, 0), (0, 0), (0, 0)))
    rows = _rows_per_block(oh, ow * (kh * kw * ci + kd * co) * xp.dtype.itemsize)
    blocks = oh // rows
    in_rows = sh * (rows - 1) + kh

    def block(acc, index):
        b, e, r = index // (dp * blocks), (index // blocks) % dp, index % blocks
        slab = lax.dynamic_slice(xp, (b, e, r * rows * sh, 0, 0), (1, 1, in_rows, wp, ci))[0, 0]
        cols = jnp.concatenate(
            [
                lax.slice(slab, (i, j, 0), (i + sh * (rows - 1) + 1, j + sw * (ow - 1) + 1, ci), (sh, sw, 1))
                for i in range(kh)
                for j in range(kw)
            ],
            axis=-1,
        ).reshape(rows * ow, kh * kw * ci)
        # dyp planes e .. e + kd - 1 are dy planes e - (kd - 1) .. e, i.e. offsets a = kd - 1 .. 0.
        g = lax.dynamic_slice(dyp, (b, e, r * rows, 0, 0), (1, kd, rows, ow, co))[0, ::-1]
        g = jnp.moveaxis(g, 0, 2).reshape(rows * ow, kd * co)
        return acc + lax.dot_general(g, cols, _CONTRACT_ROWS, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((kd * co, kh * kw * ci), jnp.float32)
    acc, _ = lax.scan(block, acc, jnp.arange(n * dp * blocks))
    return acc.reshape(kd, co, kh, kw, ci).transpose(0, 2, 3, 4, 1)


def _kernel_grad_output_grad_patches(xp, dy, kernel_size, sd):
    """Output-gradient windows as patches (height and width stride 1).

    With ``h' = h + b`` and ``w' = w + c`` the sum runs over the padded input's positions:
    ``dW[a, b, c] = sum xpad[n, d*sd + a, h', w']^T dy[n, d, h' - b, w' - c]`` (zero outside ``dy``). Per
    block of input rows, the ``kh*kw`` shifted windows of ``dy`` (padded by ``kh-1`` / ``kw-1`` on both
    sides) are stacked along channels, and each depth offset's input rows, a contiguous slice, is
    multiplied with them: ``kd`` matmuls ``x_rows^T @ patches``.
    """
    kd, kh, kw = kernel_size
    n, od, _, _, co = dy.shape
    _, _, hp, wp, ci = xp.shape
    dyp = jnp.pad(dy, ((0, 0), (0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    rows = _rows_per_block(hp, wp * kh * kw * co * dy.dtype.itemsize)
    blocks = hp // rows

    def block(acc, index):
        b, d, r = index // (od * blocks), (index // blocks) % od, index % blocks
        slab = lax.dynamic_slice(dyp, (b, d, r * rows, 0, 0), (1, 1, rows + kh - 1, wp + kw - 1, co))[0, 0]
        cols = jnp.concatenate(
            [
                slab[kh - 1 - i : kh - 1 - i + rows, kw - 1 - j : kw - 1 - j + wp]
                for i in range(kh)
                for j in range(kw)
            ],
            axis=-1,
        ).reshape(rows * wp, kh * kw * co)
        planes = lax.dynamic_slice(xp, (b, d * sd, r * rows, 0, 0), (1, kd, rows, wp, ci))[0]
        terms = [
            lax.dot_general(
                planes[a].reshape(rows * wp, ci), cols, _CONTRACT_ROWS, preferred_element_type=jnp.float32
            )
            for a in range(kd)
        ]
        return acc + jnp.stack(terms), None

    acc = jnp.zeros((kd, ci, kh * kw * co), jnp.float32)
    acc, _ = lax.scan(block, acc, jnp.arange(n * od * blocks))
    return acc.reshape(kd, ci, kh, kw, co).transpose(0, 2, 3, 1, 4)


class Conv3d(nn.Module):
    """3D convolution layer (params ``kernel`` DHWIO and ``bias``) routed through :func:`conv3d`.

    ``padding=None`` is PyTorch's symmetric ``(k-1)//2``. The input may be a sequence of arrays, the
    channel blocks of one input (a UNet decoder's ``[skip, upsampled]``): the result equals the conv of
    their concatenation, computed as a sum of convs over the blocks, so the concatenation is never
    materialised (and XLA's CPU convs run much faster on 8-16 input channels than on 24+). A block may
    be an :class:`~cinjax.models.layers.upsample.Upsampled` map, convolved at its low resolution.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Padding | None = None
    use_bias: bool = True
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform"
    )

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
        ks = triple(self.kernel_size, "kernel_size")
        parts = list(x) if isinstance(x, (list, tuple)) else [x]
        in_features = sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", self.kernel_init, (*ks, in_features, self.features), self.param_dtype)
        dtype = self.dtype or parts[0].dtype
        kernel = kernel.astype(dtype)
        y, start = None, 0
        for part in parts:
            stop = start + part.shape[-1]
            term = conv3d(
                part.astype(dtype),
                kernel[..., start:stop, :],
                strides=self.strides,
                padding=self.padding,
                impl=self.conv_impl,
            )
            y, start = (term if y is None else y + term), stop
        if self.use_bias:
            fan_in = in_features * ks[0] * ks[1] * ks[2]
            bound = 1.0 / fan_in**0.5
            y = add_bias(y, self.param("bias", _uniform(bound), (self.features,), self.param_dtype))
        return y


def _uniform(bound: float) -> nn.initializers.Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
