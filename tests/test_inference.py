"""Sliding-window inference against MONAI 1.6 (PyTorch) and against full-volume inference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference as monai_swi
from monai.inferers.utils import _get_scan_interval

from cinjax import distributed
from cinjax.inference import (
    WindowSettings,
    dense_windows,
    importance_map,
    predict_volume,
    sliding_window_inference,
)
from cinjax.models.layers.conv import conv3d
from cinjax.shapes import padding_to

ROI = (8, 8, 8)
C, K = 2, 3
RNG = np.random.default_rng(0)
MIX = RNG.standard_normal((C, K)).astype(np.float32)
RAMP = np.linspace(-1.0, 1.0, ROI[0], dtype=np.float32)


def _window_predictor_jax(windows, modality):
    """Pointwise mix + a per-window offset (window mean) + a ramp along the window's depth.

    Every window predicts differently for the same voxel, so the result depends on the blending.
    """
    out = jnp.einsum("ndhwc,ck->ndhwk", windows, MIX)
    out = out + 10.0 * jnp.mean(windows, axis=(1, 2, 3, 4))[:, None, None, None, None]
    out = out + RAMP[None, :, None, None, None]
    return out + modality[:, None, None, None, None].astype(jnp.float32)


def _window_predictor_torch(windows, modality):
    """The same predictor on NCDHW torch tensors (one modality id for the whole call)."""
    out = torch.einsum("ncdhw,ck->nkdhw", windows, torch.from_numpy(MIX))
    out = out + 10.0 * windows.mean(dim=(1, 2, 3, 4))[:, None, None, None, None]
    out = out + torch.from_numpy(RAMP)[None, None, :, None, None]
    return out + float(modality)


class TraceCounter:
    """Wraps a predictor in jax.jit and counts traces (compilations) and calls."""

    def __init__(self, fn):
        self.traces = 0
        self.calls = 0

        def traced(windows, modality):
            self.traces += 1
            return fn(windows, modality)

        self._jitted = jax.jit(traced)

    def __call__(self, windows, modality):
        self.calls += 1
        return self._jitted(windows, modality)


@pytest.fixture(scope="module")
def predictor():
    return TraceCounter(_window_predictor_jax)


def _monai(image, modality, roi, overlap, blend, sigma_scale=0.125):
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)))[None]
    fn = functools.partial(_window_predictor_torch, modality=modality)
    out = monai_swi(x, roi, 1, fn, overlap=overlap, mode=blend, sigma_scale=sigma_scale)
    return out[0].numpy().transpose(1, 2, 3, 0)


@pytest.mark.parametrize(
    "shape,roi,overlap",
    [
        ((20, 18, 13), (8, 8, 8), 0.5),
        ((20, 18, 13), (8, 6, 5), 0.25),
        ((96, 130, 57), (32, 32, 32), 0.5),
        ((33, 9, 16), (8, 8, 16), 0.0),
        ((17, 17, 17), (8, 8, 8), 0.9),
        ((17, 40, 12), (8, 8, 8), (0.5, 0.75, 0.1)),
        ((5, 8, 11), (8, 8, 8), 0.5),  # smaller than the ROI on one axis, equal on another
    ],
)
def test_window_starts_match_monai(shape, roi, overlap):
    size = tuple(max(s, r) for s, r in zip(shape, roi))
    ov = overlap if isinstance(overlap, tuple) else (overlap,) * 3
    slices = dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, ov))
    expected = [tuple(s.start for s in sl) for sl in slices]
    assert dense_windows(shape, roi, overlap) == expected


def test_importance_map_matches_monai():
    for roi, sigma in [((8, 6, 5), 0.125), ((7, 8, 9), 0.3)]:
        for blend in ("constant", "gaussian"):
            ref = compute_importance_map(roi, mode=blend, sigma_scale=sigma).numpy()
            np.testing.assert_allclose(importance_map(roi, blend, sigma), ref, rtol=1e-6, atol=0)
    assert importance_map((8, 6, 5), "gaussian").min() == pytest.approx(1e-3)  # the clamp is active


def test_padding_is_floor_before_ceil_after():
    assert padding_to((5, 8, 11), (8, 8, 8)) == ((1, 2), (0, 0), (0, 0))


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize(
    "shape,overlap",
    [((20, 18, 13), 0.5), ((14, 9, 10), 0.25), ((5, 8, 11), 0.5), ((3, 6, 7), 0.5)],
)
def test_matches_monai(predictor, blend, shape, overlap):
    image = RNG.standard_normal((*shape, C)).astype(np.float32)
    ref = _monai(image, 1, ROI, overlap, blend)
    got = sliding_window_inference(predictor, image, 1, ROI, overlap=overlap, blend=blend, num_classes=K)
    assert got.shape == (*shape, K) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(20, 18, 13), (3, 6, 7)])
def test_host_and_device_stitching_agree(predictor, shape):
    image = RNG.standard_normal((*shape, C)).astype(np.float32)
    kw = dict(overlap=0.5, blend="gaussian")
    host = sliding_window_inference(predictor, image, 0, ROI, stitch_on_host=True, **kw)
    device = sliding_window_inference(predictor, jnp.asarray(image), 0, ROI, stitch_on_host=False, **kw)
    assert isinstance(host, np.ndarray) and isinstance(device, jax.Array)
    assert host.shape == device.shape == (*shape, K)
    np.testing.assert_allclose(host, np.asarray(device), rtol=1e-6, atol=1e-6)


def test_one_compile_for_all_volume_shapes():
    counter = TraceCounter(_window_predictor_jax)
    for shape in [(20, 18, 13), (9, 8, 8), (5, 8, 11), (20, 18, 13)]:
        image = np.zeros((*shape, C), np.float32)
        n_windows = len(dense_windows(shape, ROI, 0.5))
        calls_before = counter.calls
        for host in (True, False):
            sliding_window_inference(counter, image, 1, ROI, windows_per_call=3, stitch_on_host=host)
        assert counter.calls - calls_before == 2 * -(-n_windows // 3)
    assert counter.traces == 1


def test_modality_reaches_every_window():
    def constant_per_modality(windows, modality):
        m = modality.astype(jnp.float32)[:, None, None, None, None]
        return jnp.concatenate([jnp.zeros_like(windows[..., :1]) + m, 0 * windows[..., :1] + 0.5], axis=-1)

    counter = TraceCounter(constant_per_modality)
    image = RNG.standard_normal((20, 18, 13, C)).astype(np.float32)
    for modality in (0, 1, 3):
        window = WindowSettings(ROI, windows_per_call=4, stitch_on_host=True)
        labels, logits = predict_volume(counter, image, modality, window)
        np.testing.assert_array_equal(logits[..., 0], modality)
        np.testing.assert_array_equal(labels, np.full(labels.shape, 1 if modality == 0 else 0, np.uint8))
    assert counter.traces == 1


class _PointwiseNet:
    """A two-layer 1x1x1 conv net: its receptive field is one voxel, so windows equal the full volume."""

    def __init__(self, seed=1):
        r = np.random.default_rng(seed)
        self.k1 = jnp.asarray(r.standard_normal((1, 1, 1, C, 4)).astype(np.float32))
        self.k2 = jnp.asarray(r.standard_normal((1, 1, 1, 4, K)).astype(np.float32))
        self.scale = jnp.asarray([1.0, -2.0], jnp.float32)

    def __call__(self, x, modality):
        h = jax.nn.relu(conv3d(x, self.k1, padding=((0, 0),) * 3))
        h = h * self.scale[modality][:, None, None, None, None]
        return conv3d(h, self.k2, padding=((0, 0),) * 3)


@pytest.mark.parametrize(
    "blend,shape", [("constant", (20, 18, 13)), ("gaussian", (20, 18, 13)), ("gaussian", (5, 8, 11))]
)
def test_equals_full_volume_inference_for_pointwise_model(blend, shape):
    net = _PointwiseNet()
    fn = jax.jit(net)
    image = RNG.standard_normal((*shape, C)).astype(np.float32)
    full = np.asarray(fn(jnp.asarray(image)[None], jnp.asarray([1])))[0]
    window = WindowSettings(ROI, overlap=0.5, blend=blend, windows_per_call=2)
    labels, logits = predict_volume(fn, image, 1, window)
    np.testing.assert_allclose(np.asarray(logits), full, rtol=1e-5, atol=1e-5)
    assert labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_array_equal(labels, np.argmax(full, axis=-1))


def test_windows_split_across_mesh(predictor):
    mesh = distributed.make_mesh()
    image = RNG.standard_normal((20, 18, 13, C)).astype(np.float32)
    ref = sliding_window_inference(predictor, image, 1, ROI, windows_per_call=8, stitch_on_host=True)
    for host in (True, False):
        got = sliding_window_inference(
            predictor, image, 1, ROI, windows_per_call=8, stitch_on_host=host, mesh=mesh
        )
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the mesh's 8 devices"):
        sliding_window_inference(predictor, image, 1, ROI, windows_per_call=4, mesh=mesh)


def test_clear_errors(predictor):
    image = np.zeros((9, 9, 9, C), np.float32)
    with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
        sliding_window_inference(predictor, image[..., 0], 0, ROI)
    with pytest.raises(ValueError, match="num_classes=4"):
        sliding_window_inference(predictor, image, 0, ROI, num_classes=4)
    with pytest.raises(ValueError, match="same spatial size"):
        sliding_window_inference(jax.jit(lambda w, m: w[:, ::2, ::2, ::2]), image, 0, ROI)
    with pytest.raises(ValueError, match="overlap"):
        dense_windows((9, 9, 9), ROI, 1.0)
    for bad in ({"windows_per_call": 0}, {"blend": "gausian"}, {"overlap": 1.0}, {"roi": (8, 8)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WindowSettings(**{"roi": ROI, **bad})


def test_conditional_unet_windows_batch_independently():
    """A real C-UNet (CIN encoder): windows batched 4 per call equal windows run one at a time.

    MI-Seg had to use one window per call with CIN; here every window carries its modality id and
    instance statistics are per window, so batching windows changes nothing.
    """
    from cinjax.models.unet import UNet

    model = UNet(out_channels=K, channels=(4, 8), strides=(1, 2), num_res_units=1)
    image = RNG.standard_normal((12, 10, 9, C)).astype(np.float32)
    # Random values of the right shapes (compiling model.init costs more than the whole test).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((4, *ROI, C)), jnp.zeros(4, jnp.int32))
    r = np.random.default_rng(2)
    variables = jax.tree.map(lambda p: jnp.asarray(0.3 * r.standard_normal(p.shape), jnp.float32), shapes)
    fn = jax.jit(functools.partial(model.apply, variables))

    def one_at_a_time(windows, modality):  # each window alone (copies fill the batch of 4)
        return jnp.concatenate([fn(jnp.repeat(windows[i : i + 1], 4, 0), modality)[:1] for i in range(4)])

    results = {}
    for modality in (0, 1):
        batched = sliding_window_inference(fn, image, modality, ROI, windows_per_call=4)
        alone = sliding_window_inference(one_at_a_time, image, modality, ROI, windows_per_call=4)
        np.testing.assert_allclose(np.asarray(batched), np.asarray(alone), rtol=1e-5, atol=1e-5)
        results[modality] = np.asarray(batched)
    assert np.abs(results[0] - results[1]).mean() > 1e-2
