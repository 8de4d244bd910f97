"""Blocked (flash-style) window attention equals the plain einsum + softmax formulation, in values and in
the gradients of q, k, v and the relative-position bias, with and without the shift mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinjax.models.layers import attention
from cinjax.models.layers.attention import blocked_window_attention, resolve_attention_impl, window_attention


def _inputs(b=2, nw=6, n=27, heads=2, hd=3, dtype=np.float32):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, nw, n, heads, hd)).astype(dtype)) for _ in range(3))
    bias = jnp.asarray(0.1 * rng.standard_normal((heads, n, n)).astype(np.float32))
    mask = jnp.asarray(np.where(rng.random((nw, n, n)) < 0.3, -100.0, 0.0).astype(np.float32))
    do = jnp.asarray(rng.standard_normal((b, nw, n, heads, hd)).astype(np.float32))
    return q, k, v, bias, mask, do


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one window per chunk, or all windows at once
def test_blocked_equals_plain_values_and_gradients(masked, chunk_bytes, monkeypatch):
    monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", chunk_bytes)
    q, k, v, bias, mask, do = _inputs()
    mask = mask if masked else None

    def loss(fn):
        return lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias, mask) * do)

    want = jax.value_and_grad(loss(window_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    got = jax.jit(jax.value_and_grad(loss(blocked_window_attention), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_blocked_under_bf16_keeps_fp32_scores():
    q, k, v, bias, mask, _ = _inputs()
    want = window_attention(q, k, v, bias, mask)
    got = blocked_window_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), bias, mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


def test_impl_names():
    assert resolve_attention_impl("auto") == ("blocked" if jax.default_backend() == "cpu" else "plain")
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_attention_impl("flash")
