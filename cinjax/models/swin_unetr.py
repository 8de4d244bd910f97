"""C-Swin-UNETR: MI-Seg's Swin-UNETR (MONAI 1.1 SwinUNETR with pluggable, conditional norms).

``SwinUNETR(...).apply({"params": p}, x, modality)`` maps x (B, D, H, W, C_in) and int modality ids
(B,) to logits (B, D, H, W, out_channels). Every spatial size must be divisible by 32 (patch 2 and
four 2x merges). Norm names are MI-Seg's: ``instance_cond`` (CIN, per-modality affine tables),
``instance``, ``layer`` (Swin only), ``batch``, ``group`` (conv blocks only).

Structure and parameter names follow MI-Seg's state dict (docs/mi-seg-spec.md §3, §4) so conversion is a
key map: ``swinViT/{patch_embed, layers1..4}``, ``encoder{1,2,3,4,10}``, ``decoder{5..1}``, ``out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from cinjax.models.blocks.unetr import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from cinjax.models.layers.attention import resolve_attention_impl
from cinjax.models.layers.conv import resolve_conv_impl
from cinjax.models.layers.norms import NORM_NAMES, NormSpec, instance_normalize, layer_normalize
from cinjax.models.layers.swin import (
    MERGING_OFFSETS,
    PatchEmbed,
    PatchMerging,
    SwinTransformerBlock,
    get_window_size,
    window_region_ids,
)
from cinjax.shapes import triple

VIT_NORMS = ("instance_cond", "instance", "layer")
CONV_NORMS = tuple(n for n in NORM_NAMES if n != "layer")
_INSTANCE_NORMS = ("instance_cond", "instance")
NUM_STAGES = 4


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks (odd ones shifted by window//2), then patch merging."""

    num_heads: int
    depth: int
    window: tuple[int, int, int] = (7, 7, 7)
    drop_path: tuple[float, ...] = ()
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    downsample: str = "merging"
    norm: NormSpec = NormSpec("layer")
    dtype: Any = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        _, d, h, w, _ = x.shape
        full_shift = tuple(i // 2 for i in self.window)
        window, shift = get_window_size((d, h, w), self.window, full_shift)
        padded = tuple(int(np.ceil(s / ws)) * ws for s, ws in zip((d, h, w), window))
        mask_ids = window_region_ids(padded, window, shift)
        common = dict(
            num_heads=self.num_heads,
            window=self.window,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            norm=self.norm,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        for i in range(self.depth):
            x = SwinTransformerBlock(
                shift=(0, 0, 0) if i % 2 == 0 else full_shift,
                drop_path=self.drop_path[i] if self.drop_path else 0.0,
                name=f"blocks_{i}",
                **common,
            )(x, mask_ids, modality, train)
        return PatchMerging(self.downsample, self.norm, self.dtype, name="downsample")(x, modality, train)


class SwinTransformer(nn.Module):
    """The Swin encoder (``swinViT``): returns the 5 hidden states (patch embedding, stages 1–4).

    With ``normalize`` each returned state goes through MI-Seg's ``proj_out`` (non-affine instance
    norm for instance/instance_cond vit norms, non-affine LayerNorm for ``layer``); the next stage
    receives the un-normalised tensor.
    """

    feature_size: int = 48
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    window_size: int = 7
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    normalize: bool = True
    downsample: str = "merging"
    norm: NormSpec = NormSpec("layer")
    conv_impl: str = "auto"
    attention_impl: str = "auto"
    dtype: Any = None
    remat: bool = False

    def _proj_out(self, x: jax.Array) -> jax.Array:
        if not self.normalize:
            return x
        y = instance_normalize(x) if self.norm.name in _INSTANCE_NORMS else layer_normalize(x)
        return y.astype(x.dtype)

    @nn.compact
    def __call__(
        self, x: jax.Array, modality: jax.Array | None = None, train: bool = False
    ) -> list[jax.Array]:
        x = PatchEmbed(self.feature_size, self.patch_size, self.conv_impl, self.dtype, name="patch_embed")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        outs = [self._proj_out(x)]
        rates = np.linspace(0.0, self.drop_path, sum(self.depths)).tolist()
        layer_cls = nn.remat(BasicLayer, static_argnums=(3,)) if self.remat else BasicLayer
        start = 0
        for i, depth in enumerate(self.depths):
            x = layer_cls(
                num_heads=self.num_heads[i],
                depth=depth,
                window=triple(self.window_size, "window_size"),
                drop_path=tuple(rates[start : start + depth]),
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                dropout=self.dropout,
                attn_dropout=self.attn_dropout,
                downsample=self.downsample,
                norm=self.norm,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"layers{i + 1}",
            )(x, modality, train)
            start += depth
            outs.append(self._proj_out(x))
        return outs


class SwinUNETR(nn.Module):
    """MI-Seg's (C-)Swin-UNETR. ``num_heads`` h gives heads (h, 2h, 4h, 8h) per stage.

    ``norm_affine`` is the default affine flag of every non-CIN norm; ``encoder_norm_affine``,
    ``vit_norm_affine`` and ``decoder_norm_affine`` override it per group (MI-Seg's
    ``--*_norm_no_affine`` flags; CIN tables are always learned). ``remat`` rematerialises each Swin
    stage in the backward pass (MI-Seg's ``--use_checkpoint``). ``dtype`` is the compute dtype
    (params stay fp32; norm statistics and softmax run in fp32).
    """

    out_channels: int
    feature_size: int = 48
    num_heads: int = 3
    depths: tuple[int, ...] = (2, 2, 2, 2)
    window_size: int = 7
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    normalize: bool = True
    downsample: str = "merging"
    encoder_norm: str = "instance_cond"
    vit_norm: str = "instance_cond"
    decoder_norm: str = "instance"
    norm_affine: bool = True
    encoder_norm_affine: bool | None = None
    vit_norm_affine: bool | None = None
    decoder_norm_affine: bool | None = None
    num_groups: int = 4
    num_modalities: int = 2
    conv_impl: str = "auto"
    attention_impl: str = "auto"  # plain | blocked | auto (blocked on CPU)
    dtype: Any = None
    remat: bool = False
    img_size: tuple[int, int, int] | None = None

    # --- configuration checks -------------------------------------------------------------------

    def check_config(self) -> None:
        """Raise ``ValueError`` for configurations MI-Seg rejects or that cannot work."""
        fs, h = self.feature_size, self.num_heads
        if fs % 12:
            raise ValueError(f"feature_size={fs} must be divisible by 12 (as in MI-Seg / MONAI SwinUNETR).")
        if h < 1 or fs % h:
            raise ValueError(
                f"num_heads={h} must divide feature_size={fs}: stage i has {fs}*2^i channels and "
                f"{h}*2^i heads."
            )
        if len(self.depths) != NUM_STAGES or any(int(d) < 1 for d in self.depths):
            raise ValueError(f"depths must be {NUM_STAGES} positive ints, got {self.depths}.")
        if self.patch_size != 2:
            raise ValueError(f"patch_size must be 2 (MI-Seg's fixed patch size), got {self.patch_size}.")
        if self.downsample not in MERGING_OFFSETS:
            raise ValueError(
                f"Unknown downsample {self.downsample!r}; expected one of {tuple(MERGING_OFFSETS)}."
            )
        if self.vit_norm not in VIT_NORMS:
            raise ValueError(
                f"Unknown or unsupported vit_norm {self.vit_norm!r}; expected one of {VIT_NORMS} "
                "(MI-Seg's Swin proj_out has no batch/group variant)."
            )
        for what, name in (("encoder_norm", self.encoder_norm), ("decoder_norm", self.decoder_norm)):
            if name == "layer":
                raise ValueError(
                    f"{what}='layer' is not supported for the convolution blocks (nor by MI-Seg); "
                    f"use one of {CONV_NORMS}."
                )
            if name not in CONV_NORMS:
                raise ValueError(f"Unknown {what} {name!r}; expected one of {CONV_NORMS}.")
        for what, rate in (
            ("dropout", self.dropout),
            ("attn_dropout", self.attn_dropout),
            ("drop_path", self.drop_path),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{what}={rate} must lie in [0, 1].")
        resolve_conv_impl(self.conv_impl)
        resolve_attention_impl(self.attention_impl)
        if self.img_size is not None:
            self.check_input_size(tuple(self.img_size), what="img_size")

    def check_input_size(self, size: Sequence[int], what: str = "input spatial size") -> None:
        """Each axis divisible by 32; under instance norms the deepest merge must keep > 1 voxel."""
        size = tuple(int(s) for s in size)
        div = self.patch_size**5
        if len(size) != 3 or any(s <= 0 or s % div for s in size):
            raise ValueError(
                f"{what} {size} must be 3 positive sizes divisible by {div} (patch {self.patch_size} "
                f"and four 2x patch merges); pad or crop the input (e.g. 96^3)."
            )
        deepest = tuple(s // div for s in size)
        uses_instance = self.vit_norm in _INSTANCE_NORMS or self.encoder_norm in _INSTANCE_NORMS
        if int(np.prod(deepest)) == 1 and uses_instance:
            raise ValueError(
                f"{what} {size} leaves a single voxel after the deepest patch merge ({deepest}); instance "
                "norms over one voxel are degenerate (MI-Seg/PyTorch refuses them). Use at least 64 on "
                "one axis (e.g. 32x32x64 or 96^3)."
            )

    # --- model ----------------------------------------------------------------------------------

    @nn.compact
    def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False) -> jax.Array:
        self.check_config()
        if x.ndim != 5:
            raise ValueError(f"SwinUNETR expects channels-last input (B, D, H, W, C), got shape {x.shape}.")
        self.check_input_size(x.shape[1:4])
        if self.dtype is not None:
            x = x.astype(self.dtype)
        fs = self.feature_size
        conv_kw = dict(conv_impl=self.conv_impl, dtype=self.dtype)
        enc = dict(norm=self._norm(self.encoder_norm, self.encoder_norm_affine), **conv_kw)
        dec = dict(norm=self._norm(self.decoder_norm, self.decoder_norm_affine), **conv_kw)

        hidden = SwinTransformer(
            feature_size=fs,
            num_heads=tuple(self.num_heads * 2**i for i in range(NUM_STAGES)),
            depths=tuple(int(d) for d in self.depths),
            window_size=self.window_size,
            patch_size=self.patch_size,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            drop_path=self.drop_path,
            normalize=self.normalize,
            downsample=self.downsample,
            norm=self._norm(self.vit_norm, self.vit_norm_affine),
            conv_impl=self.conv_impl,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            name="swinViT",
        )(x, modality, train)
        enc0 = UnetrBasicBlock(fs, name="encoder1", **enc)(x, modality, train)
        enc1 = UnetrBasicBlock(fs, name="encoder2", **enc)(hidden[0], modality, train)
        enc2 = UnetrBasicBlock(2 * fs, name="encoder3", **enc)(hidden[1], modality, train)
        enc3 = UnetrBasicBlock(4 * fs, name="encoder4", **enc)(hidden[2], modality, train)
        dec4 = UnetrBasicBlock(16 * fs, name="encoder10", **enc)(hidden[4], modality, train)
        dec3 = UnetrUpBlock(8 * fs, name="decoder5", **dec)(dec4, hidden[3], modality, train)
        dec2 = UnetrUpBlock(4 * fs, name="decoder4", **dec)(dec3, enc3, modality, train)
        dec1 = UnetrUpBlock(2 * fs, name="decoder3", **dec)(dec2, enc2, modality, train)
        dec0 = UnetrUpBlock(fs, name="decoder2", **dec)(dec1, enc1, modality, train)
        out = UnetrUpBlock(fs, name="decoder1", **dec)(dec0, enc0, modality, train)
        return UnetOutBlock(self.out_channels, self.conv_impl, self.dtype, name="out")(out)

    def _affine(self, override: bool | None) -> bool:
        return self.norm_affine if override is None else override

    def _norm(self, name: str, affine: bool | None) -> NormSpec:
        """The spec of one norm group; ``affine=None`` falls back to ``norm_affine``."""
        return NormSpec(name, self._affine(affine), self.num_groups, self.num_modalities)
