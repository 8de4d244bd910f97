"""Losses vs MONAI 1.1.0 golden values and an independent float64 numpy reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinjax import losses

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "monai110_losses.npz")  # MONAI 1.1.0 values


@pytest.fixture(scope="module")
def golden():
    d = np.load(GOLDEN)
    logits = d["logits"].transpose(0, 2, 3, 4, 1)  # NCDHW -> NDHWC
    labels = d["labels"][:, 0].astype(np.int32)
    return d, logits, labels


# ---------------------------------------------------------------- numpy reference (float64, NCV layout)


def _np_inputs(logits, labels, include_background):
    k = logits.shape[-1]
    x = logits.astype(np.float64).reshape(logits.shape[0], -1, k).transpose(0, 2, 1)  # (B, K, V)
    t = (labels.reshape(labels.shape[0], 1, -1) == np.arange(k)[None, :, None]).astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    logp = x - x.max(axis=1, keepdims=True) - np.log(e.sum(axis=1, keepdims=True))
    s = slice(None) if include_background else slice(1, None)
    return x[:, s], t[:, s], p[:, s], logp, t


def np_dice(logits, labels, include_background=True, squared=False, nr=0.0, dr=1e-6):
    _, t, p, _, _ = _np_inputs(logits, labels, include_background)
    inter = (p * t).sum(-1)
    g, q = ((t**2).sum(-1), (p**2).sum(-1)) if squared else (t.sum(-1), p.sum(-1))
    return np.mean(1 - (2 * inter + nr) / (g + q + dr))


def np_gdl(logits, labels, include_background=True, nr=0.0, dr=1e-6):
    _, t, p, _, _ = _np_inputs(logits, labels, include_background)
    inter, g = (p * t).sum(-1), t.sum(-1)
    with np.errstate(divide="ignore"):
        w = 1.0 / g**2
    inf = np.isinf(w)
    w[inf] = 0.0
    w = w + inf * w.max(axis=1, keepdims=True)
    return np.mean(1 - (2 * inter * w + nr) / ((g + p.sum(-1)) * w + dr))


def np_focal(logits, labels, include_background=True, gamma=2.0):
    x, t, _, _, _ = _np_inputs(logits, labels, include_background)
    bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    z = -x * (2 * t - 1)
    sig = 1 / (1 + np.exp(-z))
    return np.mean((sig**gamma * bce).mean(-1))


def np_ce(logits, labels):
    _, _, _, logp, t_all = _np_inputs(logits, labels, True)
    return -np.mean((t_all * logp).sum(1))


# ---------------------------------------------------------------- golden


@pytest.mark.parametrize(
    "key,name,kwargs",
    [
        ("dice_focal_tune", "dice_focal", {}),
        ("dice_focal_lightning_no_bg", "dice_focal", {"include_background": False}),
        ("generalized_dice_focal_tune", "generalized_dice_focal", {}),
        ("dice_ce_lightning", "dice_ce", {}),
    ],
)
def test_total_matches_monai110(golden, key, name, kwargs):
    d, logits, labels = golden
    got = jax.jit(losses.get_loss(name, **kwargs))(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), d[key], rtol=1e-5)


@pytest.mark.parametrize(
    "key,name,part",
    [
        ("dice_focal_tune__dice_part", "dice_focal", "dice"),
        ("dice_focal_tune__focal_part", "dice_focal", "focal"),
        ("generalized_dice_focal_tune__gdl_part", "generalized_dice_focal", "dice"),
        ("generalized_dice_focal_tune__focal_part", "generalized_dice_focal", "focal"),
    ],
)
def test_parts_match_monai110(golden, key, name, part):
    d, logits, labels = golden
    total, parts = losses.get_loss(name, return_parts=True)(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(parts[part]), d[key], rtol=1e-5)
    np.testing.assert_allclose(float(total), sum(float(v) for v in parts.values()), rtol=1e-6)


def test_numpy_reference_reproduces_golden(golden):
    """The float64 reference below is itself checked against MONAI 1.1.0 before being trusted."""
    d, logits, labels = golden
    np.testing.assert_allclose(
        np_dice(logits, labels, squared=True), d["dice_focal_tune__dice_part"], rtol=1e-5
    )
    np.testing.assert_allclose(np_focal(logits, labels), d["dice_focal_tune__focal_part"], rtol=1e-5)
    np.testing.assert_allclose(np_gdl(logits, labels), d["generalized_dice_focal_tune__gdl_part"], rtol=1e-5)
    np.testing.assert_allclose(
        np_dice(logits, labels) + np_ce(logits, labels), d["dice_ce_lightning"], rtol=1e-5
    )
    np.testing.assert_allclose(
        np_dice(logits, labels, False, squared=True) + np_focal(logits, labels, False),
        d["dice_focal_lightning_no_bg"],
        rtol=1e-5,
    )


# ---------------------------------------------------------------- variants without golden values


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("smooth", [(0.0, 1e-6), (1e-5, 1e-5)])
def test_variants_vs_numpy(golden, include_background, smooth):
    _, logits, labels = golden
    nr, dr = smooth
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    kw = dict(include_background=include_background, smooth_nr=nr, smooth_dr=dr)
    for squared in (True, False):
        got = losses.dice_loss(x, y, squared_pred=squared, **kw)
        np.testing.assert_allclose(
            float(got), np_dice(logits, labels, include_background, squared, nr, dr), rtol=1e-5
        )
    np.testing.assert_allclose(
        float(losses.get_loss("generalized_dice_focal", **kw)(x, y)),
        np_gdl(logits, labels, include_background, nr, dr) + np_focal(logits, labels, include_background),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        float(losses.get_loss("dice_ce", **kw)(x, y)),
        np_dice(logits, labels, include_background, False, nr, dr) + np_ce(logits, labels),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        float(losses.sigmoid_focal_loss(x, y, gamma=1.5, include_background=include_background)),
        np_focal(logits, labels, include_background, 1.5),
        rtol=1e-5,
    )


def test_trailing_channel_labels_accepted(golden):
    _, logits, labels = golden
    fn = losses.get_loss("dice_focal")
    a = fn(jnp.asarray(logits), jnp.asarray(labels))
    b = fn(jnp.asarray(logits), jnp.asarray(labels[..., None]))
    assert float(a) == float(b)


def test_absent_classes_give_finite_gradients_and_constant_dice():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 4, 5)) * 3, jnp.float32)
    labels = np.zeros((2, 4, 4, 4), np.int32)
    labels[0, :2] = 1
    labels[1, 1:3, 1:3] = 2  # classes 3 and 4 absent everywhere; sample 1 lacks class 1
    labels = jnp.asarray(labels)
    for name in ("dice_focal", "generalized_dice_focal", "dice_ce"):
        for bg in (True, False):
            g = jax.grad(losses.get_loss(name, include_background=bg))(logits, labels)
            assert np.all(np.isfinite(np.asarray(g))), (name, bg)
    # All-background volume with background excluded: every Dice term is the constant 1.
    empty = jnp.zeros((1, 4, 4, 4), jnp.int32)
    assert float(losses.dice_loss(logits[:1], empty, include_background=False)) == pytest.approx(1.0)
    assert float(losses.generalized_dice_loss(logits[:1], empty, include_background=False)) == pytest.approx(
        1.0
    )


def test_bf16_logits_give_float32_loss(golden):
    _, logits, labels = golden
    x16 = jnp.asarray(logits, jnp.bfloat16)
    for name in ("dice_focal", "generalized_dice_focal", "dice_ce"):
        got = losses.get_loss(name)(x16, jnp.asarray(labels))
        assert got.dtype == jnp.float32
        ref = losses.get_loss(name)(x16.astype(jnp.float32), jnp.asarray(labels))
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


def test_errors_are_explicit(golden):
    _, logits, labels = golden
    with pytest.raises(ValueError, match="Unknown loss"):
        losses.get_loss("dice_xent")
    with pytest.raises(ValueError, match="does not match"):
        losses.get_loss("dice_focal")(jnp.asarray(logits), jnp.asarray(labels[:, :-1]))


def test_single_terms_by_name(golden):
    d, logits, labels = golden
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    value, parts = losses.get_loss("focal", return_parts=True)(x, y)
    np.testing.assert_allclose(float(value), d["dice_focal_tune__focal_part"], rtol=1e-5)
    assert set(parts) == {"focal"}
    np.testing.assert_allclose(
        float(losses.get_loss("dice", squared_pred=True)(x, y)), d["dice_focal_tune__dice_part"], rtol=1e-5
    )
    np.testing.assert_allclose(
        float(losses.get_loss("generalized_dice")(x, y)),
        d["generalized_dice_focal_tune__gdl_part"],
        rtol=1e-5,
    )
    np.testing.assert_allclose(float(losses.get_loss("ce")(x, y)), np_ce(logits, labels), rtol=1e-5)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("squared_pred", [True, False])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_fused_dice_focal_equals_its_two_terms_in_value_and_gradient(include_background, squared_pred, gamma):
    """dice_focal_loss's one-pass forward and hand-written backward equal autodiff through dice_loss +
    sigmoid_focal_loss, with absent classes, a smoothed numerator and an out-of-range label (one-hot zero)."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 4, 5, 3, 5)) * 3, jnp.float32)
    labels = rng.integers(0, 3, (2, 4, 5, 3)).astype(np.int32)  # classes 3 and 4 absent
    labels[1, 0, 0, 0] = 7
    labels = jnp.asarray(labels)
    opts = dict(include_background=include_background, smooth_nr=1e-5, smooth_dr=1e-5)

    def fused(x):
        total, parts = losses.dice_focal_loss(
            x, labels, squared_pred=squared_pred, gamma=gamma, lambda_dice=0.7, **opts
        )
        return total, parts

    def reference(x):
        d = losses.dice_loss(x, labels, squared_pred=squared_pred, **opts)
        f = losses.sigmoid_focal_loss(x, labels, gamma=gamma, include_background=include_background)
        return 0.7 * d + f, {"dice": d, "focal": f}

    (got, got_parts), got_grad = jax.value_and_grad(fused, has_aux=True)(logits)
    (want, want_parts), want_grad = jax.value_and_grad(reference, has_aux=True)(logits)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for name in ("dice", "focal"):
        np.testing.assert_allclose(float(got_parts[name]), float(want_parts[name]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-4, atol=1e-9)
    # Each term's gradient on its own (the two cotangents of the fused op).
    for name in ("dice", "focal"):
        g1 = jax.grad(lambda x, n=name: fused(x)[1][n])(logits)
        g2 = jax.grad(lambda x, n=name: reference(x)[1][n])(logits)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-9)
