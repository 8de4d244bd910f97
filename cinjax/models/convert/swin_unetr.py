"""Key maps PyTorch → cinjax for Swin-UNETR: MI-Seg checkpoints and MONAI's own ``SwinUNETR``.

Both return a list of :class:`~cinjax.models.convert.common.ParamRule` for
:func:`~cinjax.models.convert.common.apply_rules`; ``relative_position_index`` buffers are not
mapped (cinjax recomputes them; ``apply_rules`` ignores them).

* :func:`mi_seg_rules`: MI-Seg state dicts (tests/data/mi-seg-state-dict-keys.txt). CIN layers
  ``<prefix>.norms.<m>.{weight,bias}`` become (M, C) ``scale``/``bias`` tables; plain affine norms
  ``<prefix>.{weight,bias}``; non-affine norms have no keys.
* :func:`monai_rules`: ``monai.networks.nets.SwinUNETR`` state dicts. Same key names (MI-Seg kept
  MONAI's), with LayerNorm in the Swin encoder (build the model with ``vit_norm="layer"``) and
  MONAI's non-affine instance norms in the conv blocks by default (``norm_affine=False`` for
  encoder/decoder, ``vit_norm_affine=True``). MONAI >= 1.5 fixed the v1 patch-merging order;
  convert such ``downsample="merging"`` checkpoints into a cinjax ``mergingv2`` model with
  ``source_merging="merging_fixed"`` (an exact re-ordering of the 8C merge channels).

Layouts: Conv3d (out, in, kd, kh, kw) → DHWIO; Linear (out, in) → (in, out); ConvTranspose3d
(in, out, 2, 2, 2) → (1, 1, 1, in, 8·out) for the 1x1x1-conv + depth-to-space upsampling
(:func:`~cinjax.models.blocks.unetr.transposed_kernel_from_torch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cinjax.models.blocks.unetr import transposed_kernel_from_torch
from cinjax.models.convert.common import ParamRule, conv_kernel, linear, same, stack_rows
from cinjax.models.layers.swin import MERGING_OFFSETS
from cinjax.models.swin_unetr import NUM_STAGES, SwinUNETR

# MONAI >= 1.5 PatchMerging ("merging") sub-grid order: all 8 offsets, not itertools order.
MONAI_FIXED_MERGING_OFFSETS = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 0),
    (1, 0, 1),
    (0, 1, 1),
    (1, 1, 1),
)
SOURCE_MERGINGS = ("same", "merging_fixed")

Path = tuple[str, ...]


def _norm_rules(
    path: Path, prefix: str, kind: str, affine: bool, num_modalities: int, perm: np.ndarray | None = None
) -> list[ParamRule]:
    """Rules of one norm layer; ``perm`` re-orders channels (patch-merge source order)."""
    fix = (lambda a: a) if perm is None else (lambda a: np.take(np.asarray(a), perm, axis=-1))
    if kind == "instance_cond":
        rows = range(num_modalities)
        return [
            ParamRule(
                path + (ours,),
                tuple(f"{prefix}.norms.{m}.{theirs}" for m in rows),
                lambda *r: fix(stack_rows(*r)),
            )
            for ours, theirs in (("scale", "weight"), ("bias", "bias"))
        ]
    if kind == "batch":
        raise ValueError(
            "Converting models with batch norms is not supported: their running statistics are not "
            "parameters. Use instance_cond / instance / group norms."
        )
    if not affine:
        return []
    return [
        ParamRule(path + ("scale",), (f"{prefix}.weight",), lambda w: fix(same(w))),
        ParamRule(path + ("bias",), (f"{prefix}.bias",), lambda b: fix(same(b))),
    ]


def _linear_rules(path: Path, prefix: str, bias: bool = True) -> list[ParamRule]:
    out = [ParamRule(path + ("kernel",), (f"{prefix}.weight",), linear)]
    if bias:
        out.append(ParamRule(path + ("bias",), (f"{prefix}.bias",), same))
    return out


def _conv(path: Path, key: str) -> ParamRule:
    return ParamRule(path + ("kernel",), (key,), conv_kernel)


def _res_block_rules(
    path: Path, prefix: str, in_ch: int, out_ch: int, kind: str, affine: bool, m: int
) -> list[ParamRule]:
    """UnetResBlock at ``prefix`` (e.g. ``encoder1.layer`` or ``decoder5.conv_block``)."""
    rules = []
    idx = (1, 2, 3) if in_ch != out_ch else (1, 2)
    for i in idx:
        rules.append(_conv(path + (f"conv{i}",), f"{prefix}.conv{i}.conv.weight"))
        rules += _norm_rules(path + (f"norm{i}",), f"{prefix}.norm{i}", kind, affine, m)
    return rules


def _merge_perm(
    source: tuple[tuple[int, int, int], ...], target: tuple[tuple[int, int, int], ...], c: int
) -> np.ndarray:
    """Channel permutation taking the 8C merged channels in ``source`` order to ``target`` order."""
    blocks = [source.index(off) for off in target]
    return np.concatenate([np.arange(b * c, (b + 1) * c) for b in blocks])


def _rules(model: SwinUNETR, in_channels: int, source_merging: str) -> list[ParamRule]:
    model.check_config()
    fs, m = model.feature_size, model.num_modalities
    aff = model._affine
    vit_kind, vit_aff = model.vit_norm, aff(model.vit_norm_affine)
    enc_kind, enc_aff = model.encoder_norm, aff(model.encoder_norm_affine)
    dec_kind, dec_aff = model.decoder_norm, aff(model.decoder_norm_affine)

    e: list[ParamRule] = []
    sv = ("swinViT",)
    e.append(_conv(sv + ("patch_embed", "proj"), "swinViT.patch_embed.proj.weight"))
    e.append(ParamRule(sv + ("patch_embed", "proj", "bias"), ("swinViT.patch_embed.proj.bias",), same))
    for s in range(NUM_STAGES):
        dim = fs * 2**s
        layer = sv + (f"layers{s + 1}",)
        tp = f"swinViT.layers{s + 1}.0"
        for b in range(int(model.depths[s])):
            bp, kp = layer + (f"blocks_{b}",), f"{tp}.blocks.{b}"
            for nm in ("norm1", "norm2"):
                e += _norm_rules(bp + (nm,), f"{kp}.{nm}", vit_kind, vit_aff, m)
            e.append(
                ParamRule(
                    bp + ("attn", "relative_position_bias_table"),
                    (f"{kp}.attn.relative_position_bias_table",),
                    same,
                )
            )
            e += _linear_rules(bp + ("attn", "qkv"), f"{kp}.attn.qkv", model.qkv_bias)
            e += _linear_rules(bp + ("attn", "proj"), f"{kp}.attn.proj")
            e += _linear_rules(bp + ("mlp", "linear1"), f"{kp}.mlp.linear1")
            e += _linear_rules(bp + ("mlp", "linear2"), f"{kp}.mlp.linear2")
        perm = None
        if source_merging == "merging_fixed":
            perm = _merge_perm(MONAI_FIXED_MERGING_OFFSETS, MERGING_OFFSETS["mergingv2"], dim)
        dp = layer + ("downsample",)
        e += _norm_rules(dp + ("norm",), f"{tp}.downsample.norm", vit_kind, vit_aff, m, perm)
        e.append(
            ParamRule(
                dp + ("reduction", "kernel"),
                (f"{tp}.downsample.reduction.weight",),
                (lambda w, p=perm: linear(w) if p is None else linear(w)[p]),
            )
        )

    for name, cin, cout in (
        ("encoder1", in_channels, fs),
        ("encoder2", fs, fs),
        ("encoder3", 2 * fs, 2 * fs),
        ("encoder4", 4 * fs, 4 * fs),
        ("encoder10", 16 * fs, 16 * fs),
    ):
        e += _res_block_rules((name, "layer"), f"{name}.layer", cin, cout, enc_kind, enc_aff, m)
    for name, _, cout in (
        ("decoder5", 16 * fs, 8 * fs),
        ("decoder4", 8 * fs, 4 * fs),
        ("decoder3", 4 * fs, 2 * fs),
        ("decoder2", 2 * fs, fs),
        ("decoder1", fs, fs),
    ):
        e.append(
            ParamRule(
                (name, "transp_conv", "kernel"),
                (f"{name}.transp_conv.conv.weight",),
                transposed_kernel_from_torch,
            )
        )
        e += _res_block_rules(
            (name, "conv_block"), f"{name}.conv_block", 2 * cout, cout, dec_kind, dec_aff, m
        )
    e.append(_conv(("out", "conv"), "out.conv.conv.weight"))
    e.append(ParamRule(("out", "conv", "bias"), ("out.conv.conv.bias",), same))
    return e


def _in_channels(abstract_params: Mapping[str, Any]) -> int:
    return int(abstract_params["encoder1"]["layer"]["conv1"]["kernel"].shape[3])


def mi_seg_rules(model: SwinUNETR, abstract_params: Mapping[str, Any]) -> list[ParamRule]:
    """Key map for an MI-Seg Swin-UNETR state dict into ``model`` (params like ``abstract_params``)."""
    return _rules(model, _in_channels(abstract_params), "same")


def monai_rules(
    model: SwinUNETR, abstract_params: Mapping[str, Any], *, source_merging: str = "same"
) -> list[ParamRule]:
    """Key map for a ``monai.networks.nets.SwinUNETR`` state dict into ``model``.

    ``model`` must use ``vit_norm="layer"`` and non-conditional conv-block norms (MONAI's defaults:
    ``encoder_norm=decoder_norm="instance"``, ``norm_affine=False``, ``vit_norm_affine=True``).
    ``source_merging``: ``"same"`` when the checkpoint's patch merging equals the model's
    (``mergingv2``, or ``merging`` from MONAI <= 1.4 with its duplicated sub-grids);
    ``"merging_fixed"`` for MONAI >= 1.5 ``downsample="merging"`` checkpoints (requires a
    ``mergingv2`` model).
    """
    if model.vit_norm != "layer":
        raise ValueError(
            "MONAI's SwinUNETR uses LayerNorm in the Swin encoder; build the model with "
            f"vit_norm='layer', not {model.vit_norm!r}."
        )
    if "instance_cond" in (model.encoder_norm, model.decoder_norm):
        raise ValueError(
            "MONAI's SwinUNETR has no conditional norms; use encoder_norm/decoder_norm 'instance' "
            "(or another plain norm)."
        )
    if source_merging not in SOURCE_MERGINGS:
        raise ValueError(f"Unknown source_merging {source_merging!r}; expected one of {SOURCE_MERGINGS}.")
    if source_merging == "merging_fixed" and model.downsample != "mergingv2":
        raise ValueError(
            "A MONAI >= 1.5 'merging' checkpoint uses all 8 sub-grids; load it into a model with "
            "downsample='mergingv2' (its channels are re-ordered to match)."
        )
    return _rules(model, _in_channels(abstract_params), source_merging)
