"""C-Swin-UNETR: parity with MONAI's SwinUNETR (PyTorch), CIN inside Swin, key maps, configs.

References are independent: MONAI 1.6.1's own network (its v1 PatchMerging order was fixed in 1.5,
so the MI-Seg/MONAI-1.1 order is reproduced by patching its ``forward`` with the 1.1 code below), and
a MONAI network whose Swin norms are replaced by instance norms over the stage grid plus MI-Seg's
instance-norm ``proj_out`` for the conditional model.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from monai.networks.nets import swin_unetr as monai_swin

from cinjax.models.convert.common import apply_rules
from cinjax.models.convert.swin_unetr import mi_seg_rules, monai_rules
from cinjax.models.layers import swin
from cinjax.models.layers.norms import NormSpec
from cinjax.models.swin_unetr import SwinTransformer, SwinUNETR

KEYS_FILE = Path(__file__).parent / "data" / "mi-seg-state-dict-keys.txt"
B, SPATIAL, IN_CH, OUT_CH, FS, HEADS = 2, (32, 32, 64), 2, 3, 12, 2
TOL = 1e-4


# --- helpers ------------------------------------------------------------------------------------


def _legacy_merging_forward(self, x):
    """MONAI 1.1 / MI-Seg ``PatchMerging.forward`` (v1 order with duplicated sub-grids)."""
    b, d, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 0::2, 1::2, :]
    x5 = x[:, 0::2, 1::2, 0::2, :]
    x6 = x[:, 0::2, 0::2, 1::2, :]
    x7 = x[:, 1::2, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
    return self.reduction(self.norm(x))


def _instance_proj_out(self, x, normalize=False):
    """MI-Seg ``proj_out`` for instance / instance_cond vit norms."""
    return F.instance_norm(x) if normalize else x


class StageInstanceNorm(torch.nn.Module):
    """MI-Seg's (C)IN inside Swin: affine instance norm of a (B, D, H, W, C) grid over D, H, W."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = F.instance_norm(x.permute(0, 4, 1, 2, 3), weight=self.weight, bias=self.bias, eps=1e-5)
        return y.permute(0, 2, 3, 4, 1)


def _rearrange(x, pattern):
    """The axis permutations MONAI's Swin takes from einops (not installed here)."""
    lhs, rhs = (side.split() for side in pattern.split("->"))
    return x.permute(*[lhs.index(a) for a in rhs])


@contextlib.contextmanager
def _patched(legacy_merging: bool, instance_proj_out: bool):
    saved = monai_swin.PatchMerging.forward, monai_swin.SwinTransformer.proj_out, monai_swin.rearrange
    monai_swin.rearrange = _rearrange
    if legacy_merging:
        monai_swin.PatchMerging.forward = _legacy_merging_forward
    if instance_proj_out:
        monai_swin.SwinTransformer.proj_out = _instance_proj_out
    try:
        yield
    finally:
        monai_swin.PatchMerging.forward, monai_swin.SwinTransformer.proj_out, monai_swin.rearrange = saved


def _torch_model(seed: int, downsample: str, **kw) -> torch.nn.Module:
    """MONAI SwinUNETR with random weights everywhere (norms and bias tables far from their init)."""
    torch.manual_seed(seed)
    net = MonaiSwinUNETR(
        in_channels=IN_CH,
        out_channels=OUT_CH,
        feature_size=FS,
        num_heads=tuple(HEADS * 2**i for i in range(4)),
        depths=(2, 2, 2, 2),
        downsample=downsample,
        **kw,
    ).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)
            elif re.search(r"norm\d?\.weight$", name):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif re.search(r"norm\d?\.bias$", name) or name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    return net


def _torch_forward(net, x: np.ndarray, legacy_merging=False, instance_proj_out=False) -> np.ndarray:
    with torch.no_grad(), _patched(legacy_merging, instance_proj_out):
        y = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    return y.numpy().transpose(0, 2, 3, 4, 1)


def _numpy_sd(net) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _abstract(model: SwinUNETR, shape=(1, *SPATIAL, IN_CH)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    mod = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, mod)["params"]


def _load(rules_fn, model, sd, **kw):
    abstract = _abstract(model)
    params, report = apply_rules(rules_fn(model, abstract, **kw), sd, abstract)
    assert report.ok, str(report)
    return params


def _monai_like(downsample: str, **kw) -> SwinUNETR:
    """cinjax model configured like MONAI's defaults (LayerNorm Swin, non-affine instance norms)."""
    return SwinUNETR(
        out_channels=OUT_CH,
        feature_size=FS,
        num_heads=HEADS,
        downsample=downsample,
        vit_norm="layer",
        encoder_norm="instance",
        decoder_norm="instance",
        norm_affine=False,
        vit_norm_affine=True,
        **kw,
    )


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((B, *SPATIAL, IN_CH)).astype(np.float32)


@pytest.fixture(scope="module")
def apply_fns():
    """One jitted apply per model config, shared by the tests of this module."""
    cache = {}

    def get(model: SwinUNETR):
        key = repr(model)
        if key not in cache:
            cache[key] = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
        return cache[key]

    return get


def _run(apply_fns, model, params, x, modality=None):
    mod = jnp.zeros((x.shape[0],), jnp.int32) if modality is None else jnp.asarray(modality, jnp.int32)
    return np.asarray(apply_fns(model)(params, jnp.asarray(x), mod))


# --- Swin ops against MONAI's own functions -----------------------------------------------------


@pytest.mark.parametrize(
    "dims,window,shift",
    [
        ((21, 21, 35), (7, 7, 7), (3, 3, 3)),
        ((4, 4, 14), (4, 4, 7), (0, 0, 3)),
        ((14, 7, 7), (7, 7, 7), (3, 3, 3)),
    ],
)
def test_shift_mask_matches_monai(dims, window, shift):
    ours = swin.mask_from_region_ids(swin.window_region_ids(dims, window, shift))
    ref = monai_swin.compute_mask(list(dims), window, shift, torch.device("cpu")).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert set(np.unique(ours)) <= {0.0, -100.0} and (ours == -100.0).any()


def test_window_ops_and_index_match_monai():
    attn = monai_swin.WindowAttention(dim=8, num_heads=2, window_size=(7, 7, 7))
    ref_index = attn.relative_position_index.numpy()
    np.testing.assert_array_equal(swin.relative_position_index((7, 7, 7)), ref_index)
    a = np.random.default_rng(1).standard_normal((2, 14, 8, 21, 3)).astype(np.float32)
    ref = monai_swin.window_partition(torch.from_numpy(a), (7, 4, 7)).numpy()
    np.testing.assert_array_equal(np.asarray(swin.window_partition(jnp.asarray(a), (7, 4, 7))), ref)
    back = swin.window_reverse(jnp.asarray(ref), (7, 4, 7), (2, 14, 8, 21))
    np.testing.assert_array_equal(np.asarray(back), a)
    assert swin.get_window_size((4, 8, 7), (7, 7, 7), (3, 3, 3)) == monai_swin.get_window_size(
        (4, 8, 7), (7, 7, 7), (3, 3, 3)
    )


def test_v1_merging_order_is_the_duplicated_one():
    offsets = swin.MERGING_OFFSETS["merging"]
    assert len(offsets) == 8 and len(set(offsets)) == 6
    assert (1, 1, 0) not in offsets and (0, 1, 1) not in offsets


# --- forward parity with MONAI's SwinUNETR ------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs,legacy,source_merging,conv_impl",
    [
        ("merging", "merging", True, "same", "lax"),  # MI-Seg / MONAI <= 1.4 v1 merging
        ("mergingv2", "mergingv2", False, "same", "depth2d"),
        ("mergingv2", "merging", False, "merging_fixed", "depth2d"),  # MONAI >= 1.5 "merging"
    ],
    ids=["merging-v1.1-lax", "mergingv2-depth2d", "merging-monai1.5-depth2d"],
)
def test_forward_parity_with_monai(x, apply_fns, ours, theirs, legacy, source_merging, conv_impl):
    """Both conv lowerings are checked against the same reference (so depth2d == lax on the model).
    One sample keeps CI fast; the batched window layout is covered by the conditional test."""
    x = x[:1]
    net = _torch_model(1, theirs)
    ref = _torch_forward(net, x, legacy_merging=legacy)
    model = _monai_like(ours, conv_impl=conv_impl)
    params = _load(monai_rules, model, _numpy_sd(net), source_merging=source_merging)
    out = _run(apply_fns, model, params, x)
    assert out.shape == (1, *SPATIAL, OUT_CH)
    err = np.abs(out - ref).max()
    assert err <= TOL, f"max abs error {err:.2e} vs MONAI ({ours} <- {theirs}, {conv_impl})"
    assert np.abs(ref).max() > 0.1


# --- CIN inside Swin (conditional model vs per-modality PyTorch reference) ---------------------

_CIN_KEY = re.compile(
    r"^(swinViT\..*(norm1|norm2|downsample\.norm)|encoder\d+\.layer\.norm\d)\.(weight|bias)$"
)


@pytest.fixture(scope="module")
def cin_case(x):
    """A conditional model loaded from an MI-Seg-format state dict, and its PyTorch reference."""
    net = _torch_model(2, "merging", norm_layer=StageInstanceNorm, norm_name=("instance", {"affine": True}))
    base = _numpy_sd(net)
    rng = np.random.default_rng(3)
    per_mod = []
    for _ in range(2):
        sd = dict(base)
        for k, v in base.items():
            if _CIN_KEY.match(k):
                centre = 1.0 if k.endswith("weight") else 0.0
                sd[k] = (centre + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        per_mod.append(sd)
    mi_seg = {}
    for k, v in base.items():
        m = _CIN_KEY.match(k)
        if m:
            stem, leaf = k.rsplit(".", 1)
            for i, sd in enumerate(per_mod):
                mi_seg[f"{stem}.norms.{i}.{leaf}"] = sd[k]
        else:
            mi_seg[k] = v
    modality = np.array([1, 0])
    refs = []
    for i, mod in enumerate(modality):
        net.load_state_dict({k: torch.from_numpy(v) for k, v in per_mod[mod].items()})
        refs.append(_torch_forward(net, x[i : i + 1], legacy_merging=True, instance_proj_out=True))
    model = SwinUNETR(
        out_channels=OUT_CH,
        feature_size=FS,
        num_heads=HEADS,
        encoder_norm="instance_cond",
        vit_norm="instance_cond",
        decoder_norm="instance",
        conv_impl="depth2d",
    )
    params = _load(mi_seg_rules, model, mi_seg)
    return model, params, modality, np.concatenate(refs)


def test_conditional_swin_matches_per_modality_reference(x, apply_fns, cin_case):
    model, params, modality, ref = cin_case
    out = _run(apply_fns, model, params, x, modality)
    err = np.abs(out - ref).max()
    assert err <= TOL, f"max abs error {err:.2e} vs per-modality PyTorch reference"
    # The modality tables matter: swapping the ids changes the output.
    swapped = _run(apply_fns, model, params, x, modality[::-1])
    assert np.abs(swapped - ref).max() > 1e-2


# --- parameter counts and MI-Seg key maps -------------------------------------------------------


def _keys_section(name: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    rules, total, inside = {}, None, False
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("## ["):
            inside = line.strip() == f"## [{name}]"
            continue
        if not inside:
            continue
        if line.startswith("##"):
            m = re.search(r"(\d+) trainable parameters", line)
            total = int(m.group(1)) if m else total
            continue
        if line.strip():
            key, shape, dtype, _ = line.split("\t")
            rules[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)
    return rules, total


README = {
    "swin_unetr_readme_fs36_h4": dict(feature_size=36, num_heads=4),
    "swin_unetr_readme_fs48_h3": dict(feature_size=48, num_heads=3),
}


def _readme_model(section: str) -> SwinUNETR:
    return SwinUNETR(
        out_channels=8, encoder_norm="instance_cond", vit_norm="instance_cond", **README[section]
    )


@pytest.mark.parametrize("section", list(README))
def test_param_count_matches_mi_seg(section):
    keys, total = _keys_section(section)
    abstract = _abstract(_readme_model(section), shape=(1, 64, 64, 64, 1))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract))
    assert count == total == sum(int(np.prod(s)) for s, d in keys.values() if d == "float32")
    if section.endswith("fs36_h4"):
        assert count == 35_162_156


def test_mi_seg_state_dict_loads_strictly():
    section = "swin_unetr_readme_fs36_h4"
    keys, _ = _keys_section(section)
    rng = np.random.default_rng(4)
    sd = {
        k: (rng.integers(0, 2197, s) if d == "int64" else rng.standard_normal(s, dtype=np.float32))
        for k, (s, d) in keys.items()
    }
    model = _readme_model(section)
    abstract = _abstract(model, shape=(1, 64, 64, 64, 1))
    params, report = apply_rules(mi_seg_rules(model, abstract), sd, abstract)
    assert report.ok, str(report)
    assert len(report.loaded) == sum(1 for k in keys if not k.endswith("relative_position_index"))
    flat = traverse_util.flatten_dict(params)
    np.testing.assert_array_equal(
        flat[("swinViT", "layers2", "blocks_1", "norm1", "scale")][1],
        sd["swinViT.layers2.0.blocks.1.norm1.norms.1.weight"],
    )
    np.testing.assert_array_equal(
        flat[("swinViT", "layers1", "downsample", "reduction", "kernel")],
        sd["swinViT.layers1.0.downsample.reduction.weight"].T,
    )
    w = sd["decoder3.transp_conv.conv.weight"]  # (in, out, 2, 2, 2)
    k = flat[("decoder3", "transp_conv", "kernel")].reshape(w.shape[0], 2, 2, 2, w.shape[1])
    np.testing.assert_array_equal(k[:, 1, 0, 1, :], w[:, :, 1, 0, 1])
    np.testing.assert_array_equal(
        flat[("encoder1", "layer", "conv3", "kernel")][0, 0, 0],
        sd["encoder1.layer.conv3.conv.weight"][:, :, 0, 0, 0].T,
    )


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,shape,match",
    [
        (dict(feature_size=18), (1, 64, 64, 64, 1), "divisible by 12"),
        (dict(feature_size=24, num_heads=5), (1, 64, 64, 64, 1), "must divide feature_size"),
        (dict(), (1, 64, 48, 64, 1), "divisible by 32"),
        (dict(img_size=(96, 96, 80)), (1, 64, 64, 64, 1), "img_size"),
        (dict(), (1, 32, 32, 32, 1), "single voxel"),
        (dict(encoder_norm="instance", vit_norm="layer"), (1, 32, 32, 32, 1), "single voxel"),
        (dict(downsample="merging3"), (1, 64, 64, 64, 1), "Unknown downsample"),
        (dict(vit_norm="batch"), (1, 64, 64, 64, 1), "vit_norm"),
        (dict(encoder_norm="layer"), (1, 64, 64, 64, 1), "encoder_norm='layer'"),
        (dict(decoder_norm="layer"), (1, 64, 64, 64, 1), "decoder_norm='layer'"),
        (dict(decoder_norm="instnce"), (1, 64, 64, 64, 1), "Unknown decoder_norm"),
        (dict(depths=(2, 2, 2)), (1, 64, 64, 64, 1), "depths"),
    ],
)
def test_config_errors(kw, shape, match):
    model = SwinUNETR(out_channels=2, **{"feature_size": 12, "num_heads": 1, **kw})
    with pytest.raises(ValueError, match=match):
        _abstract(model, shape=shape)


def test_layer_norm_model_accepts_single_voxel_bottleneck():
    model = SwinUNETR(out_channels=2, feature_size=12, num_heads=1, vit_norm="layer", encoder_norm="batch")
    assert jax.tree.leaves(_abstract(model, shape=(1, 32, 32, 32, 1)))


def test_monai_rules_rejects_conditional_models():
    model = SwinUNETR(out_channels=2, feature_size=12, num_heads=1)
    with pytest.raises(ValueError, match="vit_norm='layer'"):
        monai_rules(model, _abstract(model, shape=(1, 64, 64, 64, 1)))
    model = _monai_like("merging")
    with pytest.raises(ValueError, match="mergingv2"):
        monai_rules(model, _abstract(model), source_merging="merging_fixed")


# --- training mode: dropout / drop-path rngs and per-stage rematerialisation --------------------

TRAIN_KW = dict(
    out_channels=2,
    feature_size=12,
    num_heads=1,
    vit_norm="layer",
    encoder_norm="group",
    decoder_norm="group",
    dropout=0.1,
    attn_dropout=0.1,
    drop_path=0.3,
)


def _random_params(abstract, seed=5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32), abstract)


def test_train_mode_needs_dropout_rng():
    model = SwinUNETR(**TRAIN_KW)
    x = jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32)
    params = _abstract(model, shape=x.shape)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x, None, train=True), params, x)


def _grad_fn(apply):
    def loss(p, key):  # a fixed non-trivial projection of every output (normalised outputs have unit power)
        ys = jax.tree.leaves(apply(p, key))
        return sum(jnp.mean(y * jnp.cos(0.37 * jnp.arange(y.size).reshape(y.shape))) for y in ys)

    return jax.jit(jax.value_and_grad(loss))


def _assert_same_loss_and_grads(plain, remat, params):
    # rbg keys: threefry-based dropout makes XLA:CPU compiles several times slower.
    key = jax.random.key(7, impl="rbg")
    (l0, g0), (l1, g1) = plain(params, key), remat(params, key)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-4)
    l2, _ = plain(params, jax.random.key(8, impl="rbg"))
    assert abs(float(l2) - float(l0)) > 1e-6 * abs(float(l0))  # dropout / drop-path are live


def test_remat_matches_no_remat_in_training():
    """Per-stage remat of a one-stage Swin encoder (a plain and a shifted block, then merging): same
    loss and gradients, dropout and drop-path active."""
    enc = SwinTransformer(
        feature_size=12,
        num_heads=(2,),
        depths=(2,),
        norm=NormSpec("layer"),
        dropout=0.1,
        attn_dropout=0.1,
        drop_path=0.3,
    )
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 20, 16, 18, 1)), jnp.float32)
    params = _random_params(jax.eval_shape(enc.init, jax.random.key(0), x)["params"])

    def apply_fn(m):
        return lambda p, key: m.apply({"params": p}, x, None, True, rngs={"dropout": key})

    plain, remat = _grad_fn(apply_fn(enc)), _grad_fn(apply_fn(enc.clone(remat=True)))
    _assert_same_loss_and_grads(plain, remat, params)


@pytest.mark.slow
def test_remat_matches_no_remat_in_training_full_model():
    model = SwinUNETR(**TRAIN_KW)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 32, 32, 32, 1)), jnp.float32)
    params = _random_params(_abstract(model, shape=x.shape))

    def apply_fn(m):
        return lambda p, key: m.apply({"params": p}, x, None, train=True, rngs={"dropout": key})

    plain, remat = _grad_fn(apply_fn(model)), _grad_fn(apply_fn(model.clone(remat=True)))
    _assert_same_loss_and_grads(plain, remat, params)


def test_bf16_compute_keeps_fp32_params():
    model = SwinUNETR(out_channels=2, feature_size=12, num_heads=1, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 32, 32, 64, 1), jnp.float32)
    params = _abstract(model, shape=x.shape)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, jnp.zeros((1,), jnp.int32)), params, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 32, 32, 64, 2)
