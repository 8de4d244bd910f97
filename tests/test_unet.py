"""C-UNet (MI-Seg unet_vanilla): parity with a PyTorch reference assembled from MONAI blocks, param count,
conv lowering and remat invariance, config validation."""

import jax
import jax.numpy as jnp
import monai.networks.blocks as monai_blocks
import numpy as np
import pytest
import torch

from cinjax.models import build_model
from cinjax.models.convert.common import apply_rules
from cinjax.models.convert.unet import mi_seg_rules
from cinjax.models.unet import UNet

CHANNELS = (4, 8, 16, 32)
STRIDES = (1, 2, 2, 1)
IN_CH, OUT_CH, M = 1, 3, 2
SPATIAL = (16, 16, 32)


class TorchUNetVanilla(torch.nn.Module):
    """MI-Seg's UNetVanilla at a fixed modality, built from MONAI's Convolution / ResidualUnit.

    At a fixed modality a CIN layer is an affine instance norm with that modality's row, so the
    encoder uses ("instance", affine=True) and the rows are swapped in per modality.
    """

    def __init__(self, channels, strides, num_res_units, in_ch, out_ch):
        super().__init__()
        conv, res = monai_blocks.Convolution, monai_blocks.ResidualUnit
        norm = ("instance", {"affine": True})
        kw = dict(kernel_size=3, subunits=2, act="prelu", norm=norm, dropout=0.0, adn_ordering="NDA")
        levels = len(channels)
        self.pre_conv = conv(3, in_ch, channels[0], strides=strides[0], kernel_size=3, conv_only=True)
        self.down_path = torch.nn.ModuleList(
            torch.nn.Sequential(
                *[
                    res(
                        3,
                        channels[k] if r == 0 else channels[k + 1],
                        channels[k + 1],
                        strides=strides[k + 1] if r == 0 else 1,
                        **kw,
                    )
                    for r in range(num_res_units)
                ]
            )
            for k in range(levels - 1)
        )
        self.up_path = torch.nn.ModuleList()
        for j in range(levels - 1):
            s = levels - 2 - j
            self.up_path.append(
                torch.nn.Sequential(
                    torch.nn.Upsample(scale_factor=strides[s + 1]),
                    res(3, channels[s + 1] + channels[s], channels[s], strides=1, **kw),
                )
            )
        self.out = conv(3, channels[0], out_ch, kernel_size=1, conv_only=True)

    def forward(self, x):
        x = self.pre_conv(x)
        skips = [x]
        for level in self.down_path:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up_path:
            x = up[1](torch.cat([skips.pop(), up[0](x)], dim=1))
        return self.out(x)


def _mi_seg_state_dict(tmodel, rng):
    """Randomise the torch model and derive an MI-Seg state dict (CIN rows for encoder norms)."""
    sd = {}
    with torch.no_grad():
        for k, v in tmodel.state_dict().items():
            if k.endswith("adn.A.weight"):
                v.copy_(torch.from_numpy(rng.uniform(0.05, 0.5, v.shape).astype(np.float32)))
            elif ".adn.N." in k:
                base = 1.0 if k.endswith("weight") else 0.0
                v.copy_(torch.from_numpy((base + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)))
            else:
                v.mul_(1.5)
            if k.startswith("down_path") and ".adn.N." in k:
                prefix, leaf = k.rsplit(".", 1)
                base = 1.0 if leaf == "weight" else 0.0
                rows = [v.numpy().copy()] + [
                    (base + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) for _ in range(M - 1)
                ]
                for m, row in enumerate(rows):
                    sd[f"{prefix}.norms.{m}.{leaf}"] = row
            else:
                sd[k] = v.numpy().copy()
    return sd


def _torch_state_for_modality(sd, m):
    out = {}
    for k, v in sd.items():
        if ".norms." in k:
            prefix, rest = k.split(".norms.")
            mm, leaf = rest.split(".")
            if int(mm) == m:
                out[f"{prefix}.{leaf}"] = torch.from_numpy(v)
        else:
            out[k] = torch.from_numpy(v)
    return out


def _make_model(**kw):
    cfg = dict(out_channels=OUT_CH, channels=CHANNELS, strides=STRIDES, num_res_units=2, num_modalities=M)
    cfg.update(kw)
    return UNet(**cfg)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tmodel = TorchUNetVanilla(CHANNELS, STRIDES, 2, IN_CH, OUT_CH).eval()
    sd = _mi_seg_state_dict(tmodel, rng)
    model = _make_model()
    x = rng.standard_normal((2, *SPATIAL, IN_CH)).astype(np.float32)
    modality = jnp.array([0, 1], jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x), modality)["params"]
    params, report = apply_rules(mi_seg_rules(model, abstract), sd, abstract)
    assert report.ok, str(report)
    return dict(tmodel=tmodel, sd=sd, model=model, params=params, x=x, modality=modality)


@pytest.fixture(scope="module")
def jax_logits(setup):
    s = setup
    return np.asarray(jax.jit(s["model"].apply)({"params": s["params"]}, s["x"], s["modality"]))


def test_forward_matches_pytorch_per_modality(setup, jax_logits):
    s = setup
    for b, m in enumerate([0, 1]):
        s["tmodel"].load_state_dict(_torch_state_for_modality(s["sd"], m), strict=True)
        with torch.no_grad():
            ref = s["tmodel"](torch.from_numpy(s["x"][b : b + 1]).permute(0, 4, 1, 2, 3))
        ref = ref.permute(0, 2, 3, 4, 1).numpy()[0]
        err = np.abs(jax_logits[b] - ref).max()
        assert err <= 1e-4, f"modality {m}: max abs err {err}"
        assert np.abs(ref).max() > 1e-2  # a non-trivial output


def test_modalities_change_the_output(setup, jax_logits):
    s = setup
    swapped = jax.jit(s["model"].apply)({"params": s["params"]}, s["x"], s["modality"][::-1])
    assert np.abs(np.asarray(swapped) - jax_logits).max() > 1e-3


def test_lax_and_depth2d_lowerings_agree(setup, jax_logits):
    s = setup
    other = "lax" if _make_model().conv_impl == "auto" and jax.default_backend() == "cpu" else "depth2d"
    out = jax.jit(_make_model(conv_impl=other).apply)({"params": s["params"]}, s["x"], s["modality"])
    # fp32 through 12 convs and norms in two summation orders: a few ulps of the largest logit apart
    # (up to 1.05e-6 of it seen on an AVX-512 VM), while a wrong tap or offset moves logits by > 1e-2.
    scale = np.abs(jax_logits).max()
    np.testing.assert_allclose(np.asarray(out), jax_logits, atol=5e-6 * scale)


TINY = dict(out_channels=2, channels=(2, 4), strides=(1, 2), num_res_units=1, conv_impl="lax")


@pytest.fixture(scope="module")
def tiny():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 8, 1)), jnp.float32)
    modality = jnp.array([1, 0], jnp.int32)
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda p: (1.0 + 0.3 * rng.standard_normal(p.shape)).astype(np.float32),
        jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, modality)["params"],
    )
    return x, modality, params


def test_remat_gives_same_values_and_gradients(tiny):
    x, modality, params = tiny

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, x, modality, train=True) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(UNet(**TINY), p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(UNet(**TINY, remat=True), p)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_bf16_compute_stays_close_and_returns_fp32(tiny):
    x, modality, params = tiny
    ref = np.asarray(jax.jit(UNet(**TINY).apply)({"params": params}, x, modality))
    out = jax.jit(UNet(**TINY, dtype=jnp.bfloat16).apply)({"params": params}, x, modality)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


def test_dropout_is_random_in_train_and_off_in_eval(tiny):
    x, modality, params = tiny
    model = UNet(**TINY, dropout=0.5)
    variables = {"params": params}
    ev = jax.jit(model.apply)(variables, x, modality)
    ref = jax.jit(UNet(**TINY).apply)(variables, x, modality)
    np.testing.assert_allclose(ev, ref, atol=1e-6 * np.abs(np.asarray(ref)).max())
    train = jax.jit(lambda v, k: model.apply(v, x, modality, train=True, rngs={"dropout": k}))
    tr = train(variables, jax.random.key(1))
    assert np.abs(np.asarray(tr) - np.asarray(ev)).max() > 1e-3
    np.testing.assert_array_equal(tr, train(variables, jax.random.key(1)))
    assert np.abs(np.asarray(tr) - np.asarray(train(variables, jax.random.key(2)))).max() > 1e-3


def test_readme_best_parameter_count():
    model = build_model(
        dict(
            name="unet_vanilla",
            out_channels=8,
            channels=[16, 64, 128, 256, 512],
            strides=[1, 2, 2, 2, 1],
            num_res_units=3,
            num_modalities=2,
        )
    )
    x = jax.ShapeDtypeStruct((1, 8, 8, 8, 1), jnp.float32)
    mod = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, mod)["params"]
    assert sum(p.size for p in jax.tree.leaves(params)) == 62_562_904


def test_small_parameter_count_matches_torch(setup):
    n_torch = sum(v.size for v in setup["sd"].values())
    n_jax = sum(np.size(p) for p in jax.tree.leaves(setup["params"]))
    assert n_torch == n_jax


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(strides=(1, 2, 2)), "one entry per level"),
        (dict(channels=(4,), strides=(1,)), "at least 2 levels"),
        (dict(num_res_units=0), "num_res_units"),
        (dict(kernel_size=2), "odd"),
        (dict(encoder_norm="instancecond"), "not a norm"),
        (dict(decoder_norm="group", num_groups=3), "divisible by num_groups"),
        (dict(conv_impl="cudnn"), "conv_impl"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _make_model(**kw)


def test_input_validation():
    model = _make_model()
    with pytest.raises(ValueError, match="divisible by prod"):
        jax.eval_shape(
            model.init, jax.random.key(0), jnp.zeros((1, 10, 16, 16, 1)), jnp.zeros((1,), jnp.int32)
        )
    with pytest.raises(ValueError, match="modality id per sample"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))


def test_build_model_rejects_unknown_fields_and_names():
    with pytest.raises(ValueError, match="Unknown field"):
        build_model(dict(name="unet_vanilla", out_channels=2, channels=[4, 8], strides=[1, 2], featuresize=3))
    with pytest.raises(ValueError, match="Unknown model name"):
        build_model(dict(name="unetr"))


@pytest.mark.slow
def test_readme_best_c_unet_matches_pytorch_through_load_mi_seg():
    """The paper's C-UNet (62.6 M params) end to end: MI-Seg-format state dict → load_mi_seg → logits."""
    from cinjax.models.convert import load_mi_seg

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    channels, strides = (16, 64, 128, 256, 512), (1, 2, 2, 2, 1)
    tmodel = TorchUNetVanilla(channels, strides, 3, 1, 8).eval()
    sd = _mi_seg_state_dict(tmodel, rng)
    argv = [
        "--model=unet_vanilla",
        "--encoder_norm_name=instance_cond",
        "--feature_size",
        "16",
        "64",
        "128",
        "256",
        "512",
        "--num_res_units=3",
        "--strides",
        "1",
        "2",
        "2",
        "2",
        "1",
        "--out_channels=8",
    ]
    model, params = load_mi_seg({"state_dict": sd}, argv)
    x = rng.standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    out = np.asarray(jax.jit(model.apply)({"params": params}, x, jnp.array([0, 1], jnp.int32)))
    for b in range(2):
        tmodel.load_state_dict(_torch_state_for_modality(sd, b), strict=True)
        with torch.no_grad():
            ref = (
                tmodel(torch.from_numpy(x[b : b + 1]).permute(0, 4, 1, 2, 3))
                .permute(0, 2, 3, 4, 1)
                .numpy()[0]
            )
        err = np.abs(out[b] - ref).max()
        assert err <= 1e-4 * max(1.0, np.abs(ref).max()), f"modality {b}: max abs err {err}"
