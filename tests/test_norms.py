"""Norm layers: ConditionalInstanceNorm against a numpy reference and its invariants (per-modality
gradients, batch independence, invalid ids), fp32 statistics under bf16, plain norms against PyTorch, the
hand-written backward passes (norm, norm + PReLU) against PyTorch autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cinjax.models.blocks.residual_unit import Convolution
from cinjax.models.layers.norms import (
    BatchNorm,
    ConditionalInstanceNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    NormSpec,
    check_modality_ids,
    cin_layers,
    instance_norm_affine,
    instance_norm_prelu,
    layer_normalize,
    make_norm,
)

M = 3


def cin_reference(x, modality, scale, bias, eps=1e-5):
    """MI-Seg's CIN: per sample, an instance norm (biased variance) with that modality's affine row."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    axes = tuple(range(x.ndim - 2))
    for i, m in enumerate(modality):
        xi = x[i]
        mean = xi.mean(axis=axes, keepdims=True)
        var = ((xi - mean) ** 2).mean(axis=axes, keepdims=True)
        out[i] = (xi - mean) / np.sqrt(var + eps) * scale[m] + bias[m]
    return out


def _tables(c, seed=0):
    rng = np.random.default_rng(seed)
    return (1.0 + rng.standard_normal((M, c))).astype(np.float32), rng.standard_normal((M, c)).astype(
        np.float32
    )


def _cin_params(c, seed=0):
    scale, bias = _tables(c, seed)
    return {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}, scale, bias


@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 4), (3, 7, 5)], ids=["volume", "tokens"])
def test_cin_matches_numpy_reference(shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3.0 + 2.0).astype(np.float32)
    modality = np.array([2, 0, 2], np.int32)
    variables, scale, bias = _cin_params(shape[-1])
    out = jax.jit(ConditionalInstanceNorm(M).apply)(variables, x, modality)
    np.testing.assert_allclose(out, cin_reference(x, modality, scale, bias), atol=1e-5, rtol=1e-5)


def test_cin_init_is_identity_affine():
    x = np.random.default_rng(2).standard_normal((2, 3, 3, 3, 5)).astype(np.float32)
    variables = ConditionalInstanceNorm(M).init(jax.random.key(0), x, np.array([0, 1]))
    assert variables["params"]["scale"].shape == (M, 5)
    np.testing.assert_array_equal(variables["params"]["scale"], 1.0)
    np.testing.assert_array_equal(variables["params"]["bias"], 0.0)


def test_cin_gradients_reach_only_present_modalities():
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5, 4)).astype(np.float32)
    variables, _, _ = _cin_params(4)
    w = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

    def loss(v):
        return jnp.sum(ConditionalInstanceNorm(M).apply(v, x, jnp.array([0, 2])) * w)

    g = jax.jit(jax.grad(loss))(variables)["params"]
    for name in ("scale", "bias"):
        assert np.all(np.abs(g[name][0]) > 0) and np.all(np.abs(g[name][2]) > 0)
        np.testing.assert_array_equal(g[name][1], 0.0)


def test_cin_sample_does_not_depend_on_batch_mates():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 4, 5, 4)).astype(np.float32)
    variables, _, _ = _cin_params(4)
    apply = jax.jit(ConditionalInstanceNorm(M).apply)
    a = apply(variables, x, np.array([1, 0, 2]))
    x2 = x.copy()
    x2[1:] = rng.standard_normal(x2[1:].shape) * 10.0
    b = apply(variables, x2, np.array([1, 2, 2]))
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    alone = apply(variables, x[:1], np.array([1]))
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(alone)[0], atol=1e-6)


def test_cin_out_of_range_id_raises_on_host_and_is_nan_under_jit():
    x = np.random.default_rng(6).standard_normal((2, 3, 3, 3, 4)).astype(np.float32)
    variables, _, _ = _cin_params(4)
    norm = ConditionalInstanceNorm(M)
    with pytest.raises(ValueError, match=r"\[3\].*valid ids are 0, 1, 2"):
        norm.apply(variables, x, np.array([0, 3]))
    with pytest.raises(ValueError, match="CT"):
        check_modality_ids(np.array([-1]), 2, names=("CT", "MR"))
    for bad in (3, -1):
        out = np.asarray(jax.jit(norm.apply)(variables, x, jnp.array([1, bad])))
        assert np.isfinite(out[0]).all()
        assert np.isnan(out[1]).all()


def test_cin_rejects_missing_or_misshaped_modality():
    x = np.zeros((2, 3, 3, 3, 4), np.float32)
    variables, _, _ = _cin_params(4)
    with pytest.raises(ValueError, match="modality id per sample"):
        ConditionalInstanceNorm(M).apply(variables, x)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ConditionalInstanceNorm(M).apply(variables, x, np.array([0, 1, 1]))


def test_cin_bf16_input_uses_fp32_statistics():
    rng = np.random.default_rng(7)
    # A large offset with a small spread: bf16 statistics would lose the spread entirely.
    x32 = (100.0 + 0.5 * rng.standard_normal((2, 4, 4, 4, 4))).astype(np.float32)
    x16 = jnp.asarray(x32, jnp.bfloat16)
    variables, _, _ = _cin_params(4)
    apply = jax.jit(ConditionalInstanceNorm(M).apply)
    out16 = apply(variables, x16, jnp.array([0, 1]))
    assert out16.dtype == jnp.bfloat16
    ref = np.asarray(apply(variables, np.asarray(x16, np.float32), jnp.array([0, 1])))
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.05 * np.abs(ref).max())


def _torch(x):
    return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def _from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.fixture(scope="module")
def volume():
    return (np.random.default_rng(8).standard_normal((2, 3, 4, 5, 8)) * 2.0 + 1.0).astype(np.float32)


def _affine(c, seed=9):
    rng = np.random.default_rng(seed)
    return (1.0 + rng.standard_normal(c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def test_instance_norm_matches_torch(volume):
    w, b = _affine(8)
    out = InstanceNorm(affine=True).apply({"params": {"scale": w, "bias": b}}, volume)
    ref = torch.nn.functional.instance_norm(
        _torch(volume), weight=torch.from_numpy(w), bias=torch.from_numpy(b)
    )
    np.testing.assert_allclose(out, _from_torch(ref), atol=1e-5)
    plain = InstanceNorm(affine=False)
    assert plain.init(jax.random.key(0), volume) == {}
    ref = torch.nn.functional.instance_norm(_torch(volume))
    np.testing.assert_allclose(plain.apply({}, volume), _from_torch(ref), atol=1e-5)


def test_layer_norm_matches_torch(volume):
    w, b = _affine(8)
    out = LayerNorm().apply({"params": {"scale": w, "bias": b}}, volume)
    ref = torch.nn.functional.layer_norm(
        torch.from_numpy(volume), (8,), torch.from_numpy(w), torch.from_numpy(b)
    )
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_group_norm_matches_torch(volume):
    w, b = _affine(8)
    out = GroupNorm(num_groups=4).apply({"params": {"scale": w, "bias": b}}, volume)
    ref = torch.nn.functional.group_norm(_torch(volume), 4, torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(out, _from_torch(ref), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        GroupNorm(num_groups=3).init(jax.random.key(0), volume)


def test_batch_norm_matches_torch_in_train_and_eval(volume):
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), volume)
    out, updates = bn.apply(variables, volume, train=True, mutable=["batch_stats"])
    tbn = torch.nn.BatchNorm3d(8, eps=1e-5, momentum=0.1).train()
    ref = tbn(_torch(volume))
    np.testing.assert_allclose(out, _from_torch(ref), atol=1e-5)
    stats = updates["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], tbn.running_mean.numpy(), atol=1e-6)
    # PyTorch folds the unbiased batch variance into its running variance, Flax the biased one.
    biased = volume.reshape(-1, 8).var(axis=0)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * biased, rtol=1e-5)
    ev = bn.apply({**variables, "batch_stats": updates["batch_stats"]}, volume, train=False)
    assert np.abs(np.asarray(ev) - np.asarray(out)).max() > 1e-3  # running, not batch, statistics


@pytest.mark.parametrize(
    "name, cls",
    [
        ("instance_cond", ConditionalInstanceNorm),
        ("instance", InstanceNorm),
        ("layer", LayerNorm),
        ("batch", BatchNorm),
        ("group", GroupNorm),
    ],
)
def test_make_norm_dispatch(name, cls):
    norm = make_norm(name, num_modalities=4, affine=False, num_groups=2, module_name="n")
    assert isinstance(norm, cls) and norm.name == "n"
    if name == "instance_cond":
        assert norm.num_modalities == 4
    elif name == "group":
        assert norm.num_groups == 2 and norm.affine is False
    else:
        assert norm.affine is False


def test_make_norm_unknown_name():
    with pytest.raises(ValueError, match="Unknown norm 'instancecond'.*instance_cond"):
        make_norm("instancecond")


@pytest.mark.parametrize("name", ["instance_cond", "instance", "layer", "batch", "group"])
def test_norm_spec_builds_what_make_norm_builds(name):
    spec = NormSpec(name, affine=False, num_groups=2, num_modalities=4)
    assert hash(spec) == hash(NormSpec(name, False, 2, 4))  # hashable: usable as a Flax module field
    built = spec.make("n")
    assert built == make_norm(name, num_modalities=4, affine=False, num_groups=2, module_name="n")
    assert built.name == "n"
    assert built != NormSpec(name, affine=True, num_groups=1, num_modalities=3).make("n")


def test_norm_spec_unknown_name():
    with pytest.raises(ValueError, match="Unknown norm 'instancecond'"):
        NormSpec("instancecond").make()


def test_layer_normalize_matches_torch(volume):
    ref = torch.nn.functional.layer_norm(torch.from_numpy(volume), (8,))
    np.testing.assert_allclose(layer_normalize(volume), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 3), (3, 11, 4)])
def test_instance_norm_affine_values_and_gradients_match_torch_autograd(shape):
    """The hand-written backward pass equals autograd through an fp64 instance norm (x, scale, bias)."""
    rng = np.random.default_rng(0)
    x = (3.0 * rng.standard_normal(shape) + 1.5).astype(np.float32)
    scale = rng.standard_normal((shape[0], shape[-1])).astype(np.float32)
    bias = rng.standard_normal((shape[0], shape[-1])).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, vjp = jax.vjp(instance_norm_affine, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    grads = vjp(jnp.asarray(dy))

    tx, ts, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias))
    channels_first = tx.movedim(-1, 1)
    normed = torch.nn.functional.instance_norm(channels_first, eps=1e-5).movedim(1, -1)
    bshape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    ty = normed * ts.reshape(bshape) + tb.reshape(bshape)
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (tx.grad, ts.grad, tb.grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-4)


def test_instance_norm_affine_bf16_gradients_match_fp32():
    """bf16 in, bf16 out, fp32 statistics: every gradient within bf16 rounding of the fp32 one."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8, 4)), jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal((2, 4)), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, vjp32 = jax.vjp(instance_norm_affine, x, scale, bias)
    y16, vjp16 = jax.vjp(instance_norm_affine, x.astype(jnp.bfloat16), scale, bias)
    assert y16.dtype == jnp.bfloat16
    for got, want in zip(vjp16(dy.astype(jnp.bfloat16)), vjp32(dy), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "shape, offset", [((2, 5, 6, 7, 3), 1.5), ((3, 11, 4), -2.0), ((2, 6, 5, 4, 2), 1e3)]
)
def test_instance_norm_prelu_values_and_gradients_match_torch_autograd(shape, offset):
    """The fused norm + PReLU (one-pass statistics, hand-written backward pass) equals autograd through an
    fp64 instance norm, affine and PReLU, in values and every gradient (x, scale, bias, slope). The offset
    of 1e3 standard deviations is where an unshifted one-pass variance would lose its digits in fp32."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    scale = rng.standard_normal((shape[0], shape[-1])).astype(np.float32)
    bias = rng.standard_normal((shape[0], shape[-1])).astype(np.float32)
    slope = np.float32(0.25)
    dz = rng.standard_normal(shape).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), jnp.asarray(slope))
    z, vjp = jax.vjp(instance_norm_prelu, *args)
    grads = vjp(jnp.asarray(dz))

    tx, ts, tb, ta = (
        torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias, slope)
    )
    normed = torch.nn.functional.instance_norm(tx.movedim(-1, 1), eps=1e-5).movedim(1, -1)
    bshape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    tz = torch.nn.functional.prelu(normed * ts.reshape(bshape) + tb.reshape(bshape), ta.reshape(1))
    tz.backward(torch.tensor(dz, dtype=torch.float64))
    tol = 1e-4 if abs(offset) < 10 else 1e-3  # fp32 inputs near 1e3 carry ~6e-5 absolute rounding
    np.testing.assert_allclose(np.asarray(z), tz.detach().numpy(), rtol=tol, atol=tol)
    assert (tz.detach().numpy() < 0).any() and (tz.detach().numpy() > 0).any()  # both PReLU branches
    for got, want in zip(grads, (tx.grad, ts.grad, tb.grad, ta.grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), want.numpy().reshape(np.shape(got)), rtol=tol, atol=tol)


def test_instance_norm_prelu_bf16_gradients_match_fp32():
    """bf16 in, bf16 out, fp32 statistics and slope gradient: within bf16 rounding of the fp32 ones."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8, 4)), jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal((2, 4)), jnp.float32) for _ in range(2))
    slope = jnp.float32(0.25)
    dz = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, vjp32 = jax.vjp(instance_norm_prelu, x, scale, bias, slope)
    z16, vjp16 = jax.vjp(instance_norm_prelu, x.astype(jnp.bfloat16), scale, bias, slope)
    assert z16.dtype == jnp.bfloat16
    grads16 = vjp16(dz.astype(jnp.bfloat16))
    assert grads16[3].dtype == jnp.float32
    for got, want in zip(grads16, vjp32(dz), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "spec",
    [NormSpec("instance_cond", num_modalities=M), NormSpec("instance"), NormSpec("instance", affine=False)],
)
def test_conv_block_fuses_norm_and_prelu_with_the_same_params_values_and_gradients(spec):
    """MI-Seg's conv block (conv -> norm -> PReLU) takes the fused path without dropout: the same
    parameter tree, values and gradients as the separate norm and PReLU (the dropout block in eval)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 6, 3)) + 0.5, jnp.float32)
    modality = jnp.asarray([0, 2], jnp.int32)
    fused, separate = Convolution(4, norm=spec), Convolution(4, norm=spec, dropout=0.1)
    variables = fused.init(jax.random.key(0), x, modality)
    assert jax.tree.structure(variables) == jax.tree.structure(separate.init(jax.random.key(0), x, modality))
    assert "negative_slope" in variables["params"]["act"]

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x, modality)))

    (v1, g1), (v2, g2) = (
        jax.value_and_grad(lambda v, x, m=m: loss(m, v, x), argnums=(0, 1))(variables, x)
        for m in (fused, separate)
    )
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1[1], g2[1], rtol=1e-4, atol=1e-5)  # the input's
    flat1, flat2 = jax.tree_util.tree_flatten_with_path(g1[0])[0], jax.tree.leaves(g2[0])
    kernel_scale = float(jnp.max(jnp.abs(g1[0]["params"]["conv"]["kernel"])))
    for (path, a), b in zip(flat1, flat2, strict=True):
        if jax.tree_util.keystr(path).endswith("['conv']['bias']"):
            # Zero in exact arithmetic (the norm removes the channel mean): float noise on both paths.
            assert max(float(jnp.max(jnp.abs(a))), float(jnp.max(jnp.abs(b)))) < 1e-3 * kernel_scale
        else:  # fp32 sums in another order: within 1e-5 of the leaf's largest entry
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b)))
            )


@pytest.mark.parametrize(
    "model_cfg, roi",
    [
        (
            dict(name="unet_vanilla", out_channels=3, channels=(4, 8), strides=(1, 2), num_res_units=1),
            (16,) * 3,
        ),
        (dict(name="swin_unetr", out_channels=3, feature_size=12, num_heads=3), (32, 32, 64)),
    ],
)
def test_cin_layers_are_the_params_with_one_row_per_modality(model_cfg, roi):
    """Fine-tuning and the CIN analysis find the tables by structure; independently, they are exactly
    the parameters whose leading axis grows by one with one more modality. Shapes alone suffice."""
    from cinjax.models import build_model

    def shapes(m):
        model = build_model(dict(model_cfg, num_modalities=m))
        image, modality = jnp.zeros((1, *roi, 1)), jnp.zeros((1,), jnp.int32)
        tree = jax.eval_shape(lambda: model.init(jax.random.key(0), image, modality))["params"]
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return tree, {"/".join(k.key for k in path): leaf.shape for path, leaf in leaves}

    tree, small = shapes(2)
    _, large = shapes(3)
    grown = {k for k, s in small.items() if s and large[k] == (s[0] + 1, *s[1:])}
    found = cin_layers({"params": tree}, 2)
    assert grown and {f"{layer}/{q}" for layer in found for q in ("scale", "bias")} == grown
    assert cin_layers(tree, 3) == {}
