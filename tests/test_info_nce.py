"""Patch-wise InfoNCE vs an independent float64 numpy reference (with and without the projection head),
its minimum at identical pairs, and the style train step that trains the head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _cli import load_config

from cinjax import build, checkpointing, distributed, losses, steps
from cinjax.config import validate
from cinjax.models.blocks.projection import ProjectionHead


def np_info_nce(feat_a, feat_b, indices, temperature):
    """Loop-per-sample reference: normalise, similarity matrix, cross entropy both ways."""
    batch, channels = feat_a.shape[0], feat_a.shape[-1]
    total = 0.0
    for s in range(batch):
        a = feat_a[s].reshape(-1, channels).astype(np.float64)[indices[s]]
        b = feat_b[s].reshape(-1, channels).astype(np.float64)[indices[s]]
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        sim = a @ b.T / temperature
        for m in (sim, sim.T):
            row_max = m.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(m - row_max).sum(axis=1)) + row_max[:, 0]
            total += np.mean(log_z - np.diag(m)) / 2
    return total / batch


SHAPE = (2, 3, 4, 5, 6)  # (B, D, H, W, C): 60 locations


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=SHAPE).astype(np.float32)
    b = (a + 0.5 * rng.normal(size=SHAPE)).astype(np.float32)
    indices = np.stack([rng.choice(60, size=16, replace=False) for _ in range(SHAPE[0])])
    return a, b, indices


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_numpy_reference(feats, temperature):
    a, b, indices = feats
    got = losses.patch_info_nce(a, b, indices=jnp.asarray(indices), temperature=temperature)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), np_info_nce(a, b, indices, temperature), rtol=1e-5, atol=1e-5)


def test_sampled_indices_are_distinct_and_used(feats):
    a, b, _ = feats
    key = jax.random.key(7)
    idx = np.asarray(losses.sample_patch_indices(key, 2, 60, 16))
    assert idx.shape == (2, 16) and idx.min() >= 0 and idx.max() < 60
    assert all(len(set(row)) == 16 for row in idx)
    got = losses.patch_info_nce(a, b, key, num_patches=16, temperature=0.1)
    np.testing.assert_allclose(float(got), np_info_nce(a, b, idx, 0.1), rtol=1e-5, atol=1e-5)


def test_identical_pairs_minimise(feats):
    a, _, indices = feats
    idx = jnp.asarray(indices)
    rng = np.random.default_rng(1)
    same = float(losses.patch_info_nce(a, a, indices=idx, temperature=0.1))
    noisy = float(losses.patch_info_nce(a, a + rng.normal(size=a.shape), indices=idx, temperature=0.1))
    flat = a.reshape(2, 60, 6)
    shuffled = flat[:, rng.permutation(60)].reshape(a.shape)
    swapped = float(losses.patch_info_nce(a, shuffled, indices=idx, temperature=0.1))
    assert same < noisy and same < swapped


def test_orthonormal_patches_give_near_zero():
    eye = np.eye(8, dtype=np.float32)  # location v carries the unit vector e_v
    feat = np.stack([eye.reshape(2, 2, 2, 8), 3.0 * eye[::-1].reshape(2, 2, 2, 8)])
    indices = jnp.asarray(np.stack([np.arange(8), np.arange(8)[::-1]]))
    loss = float(losses.patch_info_nce(feat, feat, indices=indices, temperature=0.01))
    assert 0.0 <= loss < 1e-6
    assert float(losses.patch_info_nce(feat, feat, indices=indices, temperature=1.0)) > 1.0


def test_jit_matches_eager(feats):
    a, b, _ = feats
    key = jax.random.key(3)
    fn = functools.partial(losses.patch_info_nce, num_patches=10, temperature=0.2)
    eager = fn(a, b, key)
    jitted = jax.jit(fn)(a, b, key)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    grad = jax.jit(jax.grad(fn))(jnp.asarray(a), b, key)
    assert grad.shape == a.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_bf16_inputs_give_fp32(feats):
    a, b, indices = feats
    idx = jnp.asarray(indices)
    ref = losses.patch_info_nce(a, b, indices=idx, temperature=0.1)
    low = losses.patch_info_nce(
        jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), indices=idx, temperature=0.1
    )
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(float(low), float(ref), rtol=2e-2)


def test_errors(feats):
    a, b, indices = feats
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_patches=61"):
        losses.patch_info_nce(a, b, key, num_patches=61)
    with pytest.raises(ValueError, match="temperature"):
        losses.patch_info_nce(a, b, key, num_patches=4, temperature=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        losses.patch_info_nce(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        losses.patch_info_nce(a, b, key, indices=jnp.asarray(indices))
    with pytest.raises(ValueError, match="shape"):
        losses.patch_info_nce(a, b[..., :3], key)
    with pytest.raises(ValueError, match=r"\(B=2, P\)"):
        losses.patch_info_nce(a, b, indices=jnp.asarray(indices[0]))


def test_projection_head_matches_numpy(feats):
    """With a projection head the loss is InfoNCE of the projected features (numpy MLP reference)."""
    a, b, indices = feats
    head = ProjectionHead(7)
    variables = head.init(jax.random.key(0), jnp.zeros((1, SHAPE[-1])))
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])

    def np_head(x):
        hidden = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)
        return hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    got = losses.patch_info_nce(
        a,
        b,
        indices=jnp.asarray(indices),
        temperature=0.1,
        project=functools.partial(head.apply, variables),
    )
    want = np_info_nce(np_head(a.astype(np.float64)), np_head(b.astype(np.float64)), indices, 0.1)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def _one_style_step(config):
    """``(params before, state after, metrics)`` of one product train step on random (original,
    restyled) pairs, one pair per device, modalities alternating."""
    config.optim.schedule.warmup_steps = 0  # a non-zero first update
    validate(config)
    mesh = distributed.make_mesh()
    model = build.make_model(config)
    tx, _ = build.make_optimizer(config, model)
    init, abstract = build.make_init(config, model, tx, mesh)
    state = init()
    rng = np.random.default_rng(0)
    n, roi = jax.device_count(), tuple(config.data.roi)
    batch = {
        "image": rng.normal(size=(n, *roi, 1)).astype(np.float32),
        "image_style": rng.normal(size=(n, *roi, 1)).astype(np.float32),
        "label": rng.integers(0, 8, size=(n, *roi)).astype(np.int32),
        "modality": (np.arange(n) % 2).astype(np.int32),
    }
    step = build.make_train_step(model, tx, build.make_loss(config), mesh, build.info_nce(config))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, batch)
    assert jax.tree.structure(abstract.params) == jax.tree.structure(state.params)
    assert int(metrics["finite"]) == 1 and float(metrics["info_nce"]) > 0
    return before, state, metrics


def test_style_train_step_trains_the_projection_head(tmp_path):
    """The product's train step on (original, restyled) pairs: with ``style.info_nce_projection`` the
    head's params sit next to the model's and are updated with them, and the weights inference reads
    from a checkpoint leave it out (the step without a head runs in the tiny single-source study,
    tests/test_studies.py)."""
    config = load_config("configs/demo.py")
    with config.unlocked():
        config.data.roi = (16, 16, 16)
        config.model.channels, config.model.strides = (4, 8), (1, 2)
        config.style.enabled, config.style.info_nce_weight = True, 0.5
        config.style.info_nce_projection = 8
    before, state, _ = _one_style_step(config)
    head = state.params[steps.INFO_NCE_HEAD]
    channels = config.model.channels[1]  # down_0_0 (the default layer of a two-level UNet) outputs these
    assert head["fc1"]["kernel"].shape == (channels, 8) and head["fc2"]["kernel"].shape == (8, 8)
    for name in ("fc1", "fc2"):
        assert not np.array_equal(
            np.asarray(head[name]["kernel"]), before[steps.INFO_NCE_HEAD][name]["kernel"]
        )
    step_dir = tmp_path / "1"
    tree = {"params": jax.tree.map(np.asarray, state.params), "model_state": {}}
    ocp.PyTreeCheckpointer().save(step_dir / checkpointing.STATE_ITEM, tree)
    restored = checkpointing.restore_inference_variables(step_dir).params
    assert set(restored) == set(state.params) - {steps.INFO_NCE_HEAD}


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["c_swin", "swin"])
def test_style_train_step_on_swin_unetr(arg):
    """Style training with InfoNCE (default layer ``encoder3``) and a projection head, on the ablation's
    Swin-UNETR fs12 with and without CIN: one finite step that computes the term and trains the head."""
    config = load_config("configs/ablation.py", arg)
    with config.unlocked():
        config.style.enabled, config.style.info_nce_weight = True, 0.1
        config.style.info_nce_projection = 8
    before, state, _ = _one_style_step(config)
    kernel = np.asarray(state.params[steps.INFO_NCE_HEAD]["fc1"]["kernel"])
    assert not np.array_equal(kernel, before[steps.INFO_NCE_HEAD]["fc1"]["kernel"])
