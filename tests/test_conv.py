"""The 3D conv helper: every lowering equals lax's 3D conv (values and input and kernel gradients), the
blocked kernel gradient equals autodiff's, and Conv3d with converted PyTorch weights equals
torch.nn.functional.conv3d (also on a list of channel blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from cinjax.models.convert.common import conv_kernel
from cinjax.models.layers import conv as conv_module
from cinjax.models.layers.conv import (
    Conv3d,
    conv3d,
    folds_upsample,
    kernel_grad_blocked,
    resolve_conv_impl,
    same_padding,
)
from cinjax.models.layers.upsample import Upsampled, upsample_nearest
from cinjax.shapes import triple

CASES = [
    # kernel, stride, padding
    (1, 1, ((0, 0),) * 3),
    (1, 2, ((0, 0),) * 3),
    (2, 2, ((0, 0),) * 3),
    (2, 1, ((0, 1), (1, 0), (0, 1))),
    (3, 1, None),
    (3, 1, ((0, 0), (1, 1), (1, 1))),  # fewer output slices than input: no centre accumulator
    (3, 1, ((2, 1), (0, 0), (1, 1))),  # more output slices than input
    (3, 2, None),
    (3, 2, ((2, 0), (0, 1), (1, 2))),
    ((3, 1, 2), (2, 1, 1), ((1, 1), (0, 0), (1, 0))),
]


def _data(kernel, c_in=3, c_out=4, shape=(2, 7, 6, 4)):
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*shape, c_in)).astype(np.float32)
    w = rng.standard_normal((*k, c_in, c_out)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("impl", ["depth2d", "cpu"])
@pytest.mark.parametrize("kernel, stride, padding", CASES)
def test_lowerings_equal_lax_values_and_gradients(kernel, stride, padding, impl):
    """Height and width 6 x 4: the stride-2 cases take the phased input gradient (divisible sizes). Four
    output channels: the depth-stride-1 cases convolve their depth offsets as one stacked 2D conv."""
    _check_equals_lax(kernel, stride, padding, impl)


@pytest.mark.parametrize("impl", ["depth2d", "cpu"])
@pytest.mark.parametrize("kernel, stride, padding", [c for c in CASES if c[1] == 1 and c[0] > 1])
def test_unstacked_depth_offsets_equal_lax_values_and_gradients(kernel, stride, padding, impl, monkeypatch):
    """The same with one 2D conv per depth offset (what convs with more than 8 outputs run)."""
    monkeypatch.setattr(conv_module, "stacks_depth_offsets", lambda kernel_shape, strides: False)
    _check_equals_lax(kernel, stride, padding, impl)


@pytest.mark.parametrize("impl", ["depth2d", "cpu"])
@pytest.mark.parametrize("kernel, stride, padding", [c for c in CASES if c[1] == 1 and c[0] > 1])
@pytest.mark.parametrize("stack", [False, True])
def test_depth_chunks_equal_lax_values_and_gradients(kernel, stride, padding, impl, stack, monkeypatch):
    """Every depth-stride-1 conv in chunks of 4 output planes (the smallest chunk), stacked or not, the
    last chunk ragged where the output depth is not a multiple of 4."""
    monkeypatch.setattr(conv_module, "chunks_depth", lambda *args: True)
    monkeypatch.setattr(conv_module, "DEPTH_CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_module, "stacks_depth_offsets", lambda kernel_shape, strides: stack)
    _check_equals_lax(kernel, stride, padding, impl)


def test_depth_chunks_for_big_convs_on_ynnpack_only():
    same = ((1, 1),) * 3
    # The C-UNet's 64^3 convs at batch 2: stacked 8 -> 8 (24 outputs) and a 24-channel input chunk.
    assert conv_module.chunks_depth((2, 64, 64, 64, 8), (3, 3, 3, 8, 8), (1, 1, 1), same, True)
    assert conv_module.chunks_depth((2, 64, 64, 64, 24), (3, 3, 3, 24, 8), (1, 1, 1), same, False)
    # Eigen's narrow convs (at most 16 in and out channels, unstacked), small convs, depth strides: not.
    assert not conv_module.chunks_depth((2, 64, 64, 64, 12), (3, 3, 3, 12, 12), (1, 1, 1), same, False)
    assert not conv_module.chunks_depth((2, 16, 16, 16, 32), (3, 3, 3, 32, 32), (1, 1, 1), same, False)
    assert not conv_module.chunks_depth((2, 64, 64, 64, 8), (3, 3, 3, 8, 8), (2, 2, 2), same, True)


def test_depth_offsets_are_stacked_for_narrow_outputs_at_depth_stride_1():
    assert conv_module.stacks_depth_offsets((3, 3, 3, 16, 8), (1, 1, 1))
    assert conv_module.stacks_depth_offsets((3, 3, 3, 1, 8), (1, 2, 2))
    assert not conv_module.stacks_depth_offsets((3, 3, 3, 8, 16), (1, 1, 1))
    assert not conv_module.stacks_depth_offsets((3, 3, 3, 8, 8), (2, 2, 2))
    assert not conv_module.stacks_depth_offsets((1, 3, 3, 8, 8), (1, 1, 1))


def _check_equals_lax(kernel, stride, padding, impl):
    x, w = _data(kernel)

    def f(impl):
        def loss(x, w):
            y = conv3d(x, w, strides=stride, padding=padding, impl=impl)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)

    (l_lax, y_lax), (gx_lax, gw_lax) = f("lax")
    (l_d2, y_d2), (gx_d2, gw_d2) = f(impl)
    assert y_lax.shape == y_d2.shape
    # Equal up to float summation order: tolerances relative to each tensor's magnitude.
    for got, want in ((y_d2, y_lax), (gx_d2, gx_lax), (gw_d2, gw_lax)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(np.asarray(want)).max())


def test_strided_conv2d_input_gradient_by_phases_equals_autodiff():
    """One stride-1 conv per output phase gives lax's input gradient of a strided 2D conv: kernels
    smaller than, equal to and larger than the stride, asymmetric and over-wide paddings."""
    rng = np.random.default_rng(3)
    for kh, kw in [(3, 3), (2, 2), (1, 1), (5, 3)]:
        for stride in [(2, 2), (3, 2), (1, 2)]:
            for padding in [((1, 1), (1, 1)), ((0, 0), (0, 0)), ((2, 0), (0, 1)), ((0, 2), (1, 0))]:
                x = rng.standard_normal((2, 12, 6, 3)).astype(np.float32)
                k = rng.standard_normal((kh, kw, 3, 4)).astype(np.float32)
                y, vjp = jax.vjp(
                    lambda x, k=k, s=stride, p=padding: lax.conv_general_dilated(
                        x, k, s, p, dimension_numbers=conv_module._DN2
                    ),
                    x,
                )
                dy = rng.standard_normal(y.shape).astype(np.float32)
                got = conv_module.conv2d_input_grad_phases(
                    jnp.asarray(dy), jnp.asarray(k), stride, padding, (12, 6)
                )
                want = vjp(jnp.asarray(dy))[0]
                np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(np.asarray(want)).max())


def test_strided_conv_of_an_indivisible_size_keeps_xla_gradient():
    """Widths not divisible by the stride have unequal phases: the lowering keeps XLA's input gradient."""
    assert conv_module._phases_apply((6, 4), (2, 2)) and not conv_module._phases_apply((6, 5), (2, 2))
    x, w = _data(3, shape=(1, 4, 6, 5))
    grads = [
        jax.grad(lambda x, impl=impl: jnp.sum(jnp.sin(conv3d(x, w, strides=2, impl=impl))))(x)
        for impl in ("lax", "cpu")
    ]
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-5 * np.abs(np.asarray(grads[0])).max())


def _autodiff_kernel_grad(x, w, stride, padding):
    """A random output gradient ``dy`` and lax's kernel gradient for it."""
    y, vjp = jax.vjp(lambda w: conv3d(x, w, strides=stride, padding=padding, impl="lax"), w)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
    return dy, vjp(dy)[0]


# Output-gradient patches need height and width stride 1, input-plane patches depth stride 1 (refusing
# the others is tested below); the last input-plane case has in-plane strides.
KERNEL_GRAD_CASES = (
    [(*case, "input") for case in CASES]
    + [(*case, "output_grad") for case in CASES if triple(case[1], "stride")[1:] == (1, 1)]
    + [(*case, "input_plane") for case in CASES if triple(case[1], "stride")[0] == 1]
    + [(3, (1, 2, 2), ((1, 1), (1, 0), (0, 1)), "input_plane")]
)


@pytest.mark.parametrize("kernel, stride, padding, patches", KERNEL_GRAD_CASES)
@pytest.mark.parametrize("block_bytes", [1, 1 << 20])
def test_blocked_kernel_gradient_equals_autodiff(kernel, stride, padding, block_bytes, patches, monkeypatch):
    """Either operand as the im2col patches, one row per block or the whole plane: lax's gradient."""
    monkeypatch.setattr(conv_module, "PATCH_BLOCK_BYTES", block_bytes)
    x, w = _data(kernel, c_in=5, c_out=3, shape=(2, 7, 6, 5))
    dy, want = _autodiff_kernel_grad(x, w, stride, padding)
    padding = padding if padding is not None else same_padding(w.shape[:3])
    got = jax.jit(kernel_grad_blocked, static_argnums=(2, 3, 4, 5))(
        x, dy, w.shape[:3], triple(stride, "stride"), padding, patches
    )
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(np.asarray(want)).max())


def test_blocked_kernel_gradient_refuses_output_grad_patches_for_in_plane_strides():
    x, _ = _data(3)
    with pytest.raises(ValueError, match="height and width stride 1"):
        kernel_grad_blocked(
            x, np.zeros((2, 4, 3, 3, 4), np.float32), (3, 3, 3), (2, 2, 2), same_padding(3), "output_grad"
        )


def test_blocked_kernel_gradient_refuses_input_plane_patches_for_depth_strides():
    x, _ = _data(3)
    with pytest.raises(ValueError, match="depth stride 1"):
        kernel_grad_blocked(
            x, np.zeros((2, 4, 3, 3, 4), np.float32), (3, 3, 3), (2, 1, 1), same_padding(3), "input_plane"
        )


@pytest.mark.parametrize(
    "c_in, c_out, kernel, strides, want",
    [
        (8, 8, 3, (1, 1, 1), "input_plane"),  # the 64^3 convs of a narrow UNet level
        (1, 12, 3, (1, 2, 2), "input_plane"),
        (16, 64, 2, (1, 1, 1), "input"),  # the decoder's folded conv: wide outputs
        (8, 16, 3, (2, 2, 2), "input"),  # depth stride
        (16, 8, 3, (1, 1, 1), "output_grad"),
    ],
)
def test_blocked_kernel_gradient_auto_choice(c_in, c_out, kernel, strides, want, monkeypatch):
    """``"auto"`` (the product's path) takes the patches that measured fastest for the shape."""
    taken = []
    for name in ("input", "input_plane", "output_grad"):
        real = getattr(conv_module, f"_kernel_grad_{name}_patches")
        monkeypatch.setattr(
            conv_module, f"_kernel_grad_{name}_patches", lambda *a, n=name, f=real: taken.append(n) or f(*a)
        )
    x, w = _data(kernel, c_in=c_in, c_out=c_out, shape=(1, 4, 16, 16))
    dy, want_grad = _autodiff_kernel_grad(x, w, strides, None)
    got = kernel_grad_blocked(x, dy, w.shape[:3], strides, same_padding(kernel))
    assert taken == [want]
    np.testing.assert_allclose(got, want_grad, atol=1e-5 * np.abs(np.asarray(want_grad)).max())


TORCH_CASES = [(3, 1, None), (3, 2, None), (1, 1, ((0, 0),) * 3), (2, 2, ((0, 0),) * 3)]


@pytest.mark.parametrize("kernel, stride, padding", TORCH_CASES)
@pytest.mark.parametrize("impl", ["lax", "depth2d", "cpu"])
def test_conv3d_module_matches_torch(kernel, stride, padding, impl):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 6, 5)).astype(np.float32)  # NCDHW, as PyTorch
    w = rng.standard_normal((4, 3, kernel, kernel, kernel)).astype(np.float32)  # (out, in, kd, kh, kw)
    b = rng.standard_normal(4).astype(np.float32)
    pad = (kernel - 1) // 2 if padding is None else 0
    ref = torch.nn.functional.conv3d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride, pad
    )
    layer = Conv3d(4, kernel_size=kernel, strides=stride, padding=padding, conv_impl=impl)
    variables = {"params": {"kernel": conv_kernel(w), "bias": b}}
    out = jax.jit(layer.apply)(variables, np.moveaxis(x, 1, -1))
    np.testing.assert_allclose(out, np.moveaxis(ref.numpy(), 1, -1), atol=1e-4, rtol=1e-5)


def test_conv3d_of_channel_blocks_equals_conv_of_their_concatenation():
    rng = np.random.default_rng(3)
    skip, up = (rng.standard_normal((2, 6, 6, 4, c)).astype(np.float32) for c in (2, 3))
    layer = Conv3d(4, kernel_size=3)
    params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), np.concatenate([skip, up], -1))
    whole = layer.apply(params, np.concatenate([skip, up], -1))
    np.testing.assert_allclose(layer.apply(params, (skip, up)), whole, atol=1e-5)
    grads = jax.grad(lambda p, a, b: jnp.sum(layer.apply(p, (a, b)) ** 2), argnums=(0, 1, 2))(
        params, skip, up
    )
    ref = jax.grad(lambda p, ab: jnp.sum(layer.apply(p, ab) ** 2), argnums=(0, 1))(
        params, np.concatenate([skip, up], -1)
    )
    np.testing.assert_allclose(grads[0]["params"]["kernel"], ref[0]["params"]["kernel"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(grads[1:], -1), ref[1], rtol=1e-4, atol=1e-4)


UPSAMPLED_CASES = [
    # kernel, stride, padding, factor: the folded cases first, then ones that upsample eagerly
    (3, 1, None, 2),
    (1, 1, None, 2),
    (3, 1, ((0, 0), (1, 1), (1, 1)), 2),
    (3, 2, None, 2),
    (2, 1, ((0, 1),) * 3, 2),
    (3, 1, None, 3),
]


@pytest.mark.parametrize("impl", ["lax", "cpu"])
@pytest.mark.parametrize("kernel, stride, padding, factor", UPSAMPLED_CASES)
def test_conv_of_upsampled_equals_conv_of_the_upsampled_map(kernel, stride, padding, factor, impl):
    """Values and both gradients (low-resolution map and kernel) against lax's conv of the materialised
    nearest upsampling; odd low-resolution sizes, so every border phase is exercised."""
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, 3, 4, 5, 3)).astype(np.float32)
    w = rng.standard_normal((kernel,) * 3 + (3, 4)).astype(np.float32)
    folds = folds_upsample((kernel,) * 3, triple(stride), padding or same_padding(kernel), factor)
    assert folds == (factor == 2 and stride == 1 and padding is None)

    def loss(fold):
        def f(u, w):
            if fold:
                y = conv3d(Upsampled(u, factor), w, strides=stride, padding=padding, impl=impl)
            else:
                y = conv3d(upsample_nearest(u, factor), w, strides=stride, padding=padding, impl="lax")
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(u, w)

    (_, y_ref), grads_ref = loss(False)
    (_, y), grads = loss(True)
    assert y.shape == y_ref.shape
    for got, want in ((y, y_ref), *zip(grads, grads_ref)):
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(np.asarray(want)).max())


def test_upsampled_block_in_conv3d_and_its_pytree():
    """Conv3d over ``[skip, Upsampled]`` equals it over ``[skip, upsampled map]``; an Upsampled survives
    a pytree round trip (what ``nn.remat`` does to a unit's input)."""
    rng = np.random.default_rng(5)
    skip = rng.standard_normal((1, 4, 6, 4, 2)).astype(np.float32)
    low = rng.standard_normal((1, 2, 3, 2, 3)).astype(np.float32)
    layer = Conv3d(4, kernel_size=3)
    params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), (skip, upsample_nearest(low, 2)))
    want = layer.apply(params, (skip, upsample_nearest(low, 2)))
    lazy = jax.tree.map(lambda a: a, Upsampled(jnp.asarray(low), 2))
    assert isinstance(lazy, Upsampled) and lazy.factor == 2 and lazy.shape == (1, 4, 6, 4, 3)
    np.testing.assert_allclose(layer.apply(params, (skip, lazy)), want, atol=1e-5)
    np.testing.assert_array_equal(lazy.materialize(), upsample_nearest(low, 2))


def test_conv3d_module_param_shapes_and_dtype():
    layer = Conv3d(6, kernel_size=3, strides=2, dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 4, 2), jnp.float32)
    params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), x)["params"]
    assert params["kernel"].shape == (3, 3, 3, 2, 6) and params["kernel"].dtype == jnp.float32
    assert params["bias"].shape == (6,)
    bound = 1.0 / np.sqrt(3 * 3 * 3 * 2)  # PyTorch's default init range (fan_in = 54)
    assert (
        np.abs(np.asarray(params["kernel"])).max() <= bound
        and np.abs(np.asarray(params["bias"])).max() <= bound
    )
    y = jax.jit(layer.apply)({"params": params}, x)
    assert y.shape == (1, 2, 2, 2, 6) and y.dtype == jnp.bfloat16


def test_padding_and_impl_helpers():
    assert same_padding(3) == ((1, 1),) * 3
    assert same_padding((1, 3, 5)) == ((0, 0), (1, 1), (2, 2))
    assert resolve_conv_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "lax")
    with pytest.raises(ValueError, match="Unknown conv_impl"):
        resolve_conv_impl("cudnn")
