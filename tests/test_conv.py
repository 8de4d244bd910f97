"""The 3D conv helper: the depth2d lowering equals lax's 3D conv (values and gradients), and Conv3d with
converted PyTorch weights equals torch.nn.functional.conv3d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cinjax.models.convert.common import conv_kernel
from cinjax.models.layers.conv import Conv3d, conv3d, resolve_conv_impl, same_padding

CASES = [
    # kernel, stride, padding
    (1, 1, ((0, 0),) * 3),
    (1, 2, ((0, 0),) * 3),
    (2, 2, ((0, 0),) * 3),
    (2, 1, ((0, 1), (1, 0), (0, 1))),
    (3, 1, None),
    (3, 2, None),
    (3, 2, ((2, 0), (0, 1), (1, 2))),
    ((3, 1, 2), (2, 1, 1), ((1, 1), (0, 0), (1, 0))),
]


def _data(kernel, c_in=3, c_out=4, shape=(2, 7, 6, 5)):
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*shape, c_in)).astype(np.float32)
    w = rng.standard_normal((*k, c_in, c_out)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("kernel, stride, padding", CASES)
def test_depth2d_equals_lax_values_and_gradients(kernel, stride, padding):
    x, w = _data(kernel)

    def f(impl):
        def loss(x, w):
            y = conv3d(x, w, strides=stride, padding=padding, impl=impl)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)

    (l_lax, y_lax), (gx_lax, gw_lax) = f("lax")
    (l_d2, y_d2), (gx_d2, gw_d2) = f("depth2d")
    assert y_lax.shape == y_d2.shape
    # Equal up to float summation order: tolerances relative to each tensor's magnitude.
    for got, want in ((y_d2, y_lax), (gx_d2, gx_lax), (gw_d2, gw_lax)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(np.asarray(want)).max())


TORCH_CASES = [(3, 1, None), (3, 2, None), (1, 1, ((0, 0),) * 3), (2, 2, ((0, 0),) * 3)]


@pytest.mark.parametrize("kernel, stride, padding", TORCH_CASES)
@pytest.mark.parametrize("impl", ["lax", "depth2d"])
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
    assert resolve_conv_impl("auto") == ("depth2d" if jax.default_backend() == "cpu" else "lax")
    with pytest.raises(ValueError, match="Unknown conv_impl"):
        resolve_conv_impl("cudnn")
