"""Window self-attention computed a few windows at a time (flash-style), with its own backward pass.

Swin's windows hold up to 7^3 = 343 tokens with small heads (4 channels at feature size 12), so the
plain formulation is dominated by memory traffic: the (B, nW, heads, 343, 343) fp32 scores of one
stage-1 block are ~350 MB for a batch of two 64^3 crops, written and read several times forward and
backward, and the relative-position-bias gradient is a reduction over all of them. Here the scores of a
chunk of windows are made, used and dropped while they are in cache: the forward keeps only the output
and the per-row log-sum-exp, and the backward recomputes the probabilities chunk by chunk (the
FlashAttention recurrence), accumulating the bias gradient in the scan carry. Values and gradients
equal the plain formulation's within float rounding (tests).

* :func:`window_attention`: plain einsum + softmax reference (any platform; the GPU default).
* :func:`blocked_window_attention`: the chunked form (the CPU default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

ATTENTION_IMPLS = ("plain", "blocked", "auto")
# Scores (fp32) per chunk of windows: one stage-1 window (1.4 MB) is fastest on a 2-core CPU (measured).
SCORE_CHUNK_BYTES = 2 << 20


def resolve_attention_impl(impl: str) -> str:
    """Map ``"auto"`` to ``"blocked"`` on CPU and ``"plain"`` elsewhere; validate the name."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}.")
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "plain"
    return impl


def window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """``softmax(q k^T + bias + mask) v`` per window and head.

    ``q``, ``k``, ``v``: (B, nW, N, heads, hd), ``q`` already scaled; ``bias``: (heads, N, N) fp32;
    ``mask``: (nW, N, N) fp32 or None. Scores in fp32; returns (B, nW, N, heads, hd) in ``v``'s dtype.
    """
    logits = jnp.einsum("bwnhd,bwmhd->bwhnm", q, k, preferred_element_type=jnp.float32) + bias
    if mask is not None:
        logits = logits + mask[None, :, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bwhnm,bwmhd->bwnhd", attn, v)


def _chunk(num_windows: int, heads: int, n: int) -> int:
    """Windows per chunk: the largest divisor of ``num_windows`` whose scores fit the budget."""
    per_window = heads * n * n * 4
    fits = [
        c for c in range(1, num_windows + 1) if num_windows % c == 0 and c * per_window <= SCORE_CHUNK_BYTES
    ]
    return max(fits or [1])


def _scores(q, k, bias, mask, index, chunk, nw):
    """fp32 logits (chunk, heads, N, N) of the ``index``-th chunk of flattened windows."""
    s = jnp.einsum("cnhd,cmhd->chnm", q, k, preferred_element_type=jnp.float32) + bias
    if mask is not None:
        window = (index * chunk + jnp.arange(chunk)) % nw
        s = s + mask[window][:, None]
    return s


# The products with the (chunk, heads, N, N) scores contract over their rows or columns as they lie,
# with the small (N, head_dim) operands transposed instead: written as einsums, XLA:CPU transposed the
# scores themselves (a strided 343 x 343 copy per head and window, ~13 % of the C-Swin-UNETR step).
_BATCH2 = ((0, 1), (0, 1))


def _heads_first(x: jax.Array) -> jax.Array:
    """(c, N, h, d) -> (c, h, N, d)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _tokens_first(x: jax.Array) -> jax.Array:
    """(c, h, N, d) -> (c, N, h, d)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _rows_times(a: jax.Array, x: jax.Array) -> jax.Array:
    """``a @ x`` per (chunk, head): a (c, h, n, m), x (c, h, m, d) -> (c, h, n, d), fp32."""
    return lax.dot_general(a, x, (((3,), (2,)), _BATCH2), preferred_element_type=jnp.float32)


def _cols_times(x: jax.Array, a: jax.Array) -> jax.Array:
    """``a^T @ x`` per (chunk, head), as ``(x^T a)^T``: x (c, h, n, d), a (c, h, n, m) -> (c, m, h, d),
    fp32."""
    xt = jnp.swapaxes(x, 2, 3)  # (c, h, d, n)
    out = lax.dot_general(xt, a, (((3,), (2,)), _BATCH2), preferred_element_type=jnp.float32)  # (c, h, d, m)
    return jnp.transpose(out, (0, 3, 1, 2))


def _flat(x: jax.Array, chunk: int) -> jax.Array:
    """(B, nW, N, h, d) → (chunks, chunk, N, h, d)."""
    return x.reshape(-1, chunk, *x.shape[2:])


def blocked_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """:func:`window_attention`, computed chunk by chunk of windows (module docstring)."""
    if mask is None:
        return _blocked(q, k, v, bias)
    return _blocked_masked(q, k, v, bias, mask)


def _forward(q, k, v, bias, mask):
    b, nw, n, h, d = q.shape
    chunk = _chunk(b * nw, h, n)
    qs, ks, vs = (_flat(t, chunk) for t in (q, k, v))

    def body(_, xs):
        index, qc, kc, vc = xs
        s = _scores(qc, kc, bias, mask, index, chunk, nw)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        # Normalised after the product: one full-size pass fewer.
        o = _rows_times(p.astype(vc.dtype), _heads_first(vc)) / total
        return None, (_tokens_first(o).astype(vc.dtype), (m + jnp.log(total))[..., 0])

    _, (o, lse) = lax.scan(body, None, (jnp.arange(qs.shape[0]), qs, ks, vs))
    return o.reshape(q.shape), lse


def _backward(q, k, v, bias, mask, o, lse, do):
    b, nw, n, h, d = q.shape
    chunk = _chunk(b * nw, h, n)
    qs, ks, vs, os_, dos = (_flat(t, chunk) for t in (q, k, v, o, do))

    def body(dbias, xs):
        index, qc, kc, vc, oc, lc, doc = xs
        p = jnp.exp(_scores(qc, kc, bias, mask, index, chunk, nw) - lc[..., None])
        delta = jnp.einsum("cnhd,cnhd->chn", doc.astype(jnp.float32), oc.astype(jnp.float32))
        dv = _cols_times(_heads_first(doc), p.astype(doc.dtype))
        dp = jnp.einsum("cnhd,cmhd->chnm", doc, vc, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        dq = _tokens_first(_rows_times(ds.astype(kc.dtype), _heads_first(kc)))
        dk = _cols_times(_heads_first(qc), ds.astype(qc.dtype))
        return dbias + jnp.sum(ds, axis=0), (dq, dk, dv)

    xs = (jnp.arange(qs.shape[0]), qs, ks, vs, os_, lse, dos)
    dbias, (dq, dk, dv) = lax.scan(body, jnp.zeros_like(bias), xs)
    return tuple(g.reshape(t.shape).astype(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v))), dbias


@jax.custom_vjp
def _blocked(q, k, v, bias):
    return _forward(q, k, v, bias, None)[0]


def _blocked_fwd(q, k, v, bias):
    o, lse = _forward(q, k, v, bias, None)
    return o, (q, k, v, bias, o, lse)


def _blocked_bwd(residuals, do):
    q, k, v, bias, o, lse = residuals
    (dq, dk, dv), dbias = _backward(q, k, v, bias, None, o, lse, do)
    return dq, dk, dv, dbias


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@jax.custom_vjp
def _blocked_masked(q, k, v, bias, mask):
    return _forward(q, k, v, bias, mask)[0]


def _blocked_masked_fwd(q, k, v, bias, mask):
    o, lse = _forward(q, k, v, bias, mask)
    return o, (q, k, v, bias, mask, o, lse)


def _blocked_masked_bwd(residuals, do):
    q, k, v, bias, mask, o, lse = residuals
    (dq, dk, dv), dbias = _backward(q, k, v, bias, mask, o, lse, do)
    return dq, dk, dv, dbias, jnp.zeros_like(mask)  # the shift mask is a constant


_blocked_masked.defvjp(_blocked_masked_fwd, _blocked_masked_bwd)
