"""Model config presets of the paper's networks (MI-Seg README configurations).

Each function returns a model ConfigDict (``name`` + module fields) for
:func:`cinjax.models.build_model`; every field is present so any can be overridden from the command line.

* :func:`c_unet` / :func:`unet`: MI-Seg ``unet_vanilla`` README best (channels 16 64 128 256 512,
  strides 1 2 2 2 1, 3 residual units, 8 classes), with conditional (``instance_cond``) or plain
  instance norms in the encoder; the decoder is a plain affine instance norm in both (as in MI-Seg).
* :func:`c_swin_unetr` / :func:`swin_unetr`: Swin-UNETR fs 36 / 4 heads (README predict command) or
  fs 48 / 3 heads (README train/test commands); conditional = CIN in the conv encoder and in the Swin
  transformer, non-conditional = MI-Seg's defaults (instance norm / LayerNorm).

:data:`PRESETS` names them (``configs/mmwhs.py:MODEL`` and ``configs/models.py:NAME`` take these names).
"""

from __future__ import annotations

import ml_collections

from cinjax.data import mmwhs

NUM_CLASSES = mmwhs.NUM_CLASSES
NUM_MODALITIES = len(mmwhs.MODALITIES)


def _unet(encoder_norm: str, out_channels: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "unet_vanilla",
            "out_channels": out_channels,
            "channels": (16, 64, 128, 256, 512),
            "strides": (1, 2, 2, 2, 1),
            "num_res_units": 3,
            "kernel_size": 3,
            "dropout": 0.0,
            "encoder_norm": encoder_norm,
            "decoder_norm": "instance",
            "norm_affine": True,
            "num_groups": 4,
            "num_modalities": NUM_MODALITIES,
            "conv_impl": "auto",
            "dtype": None,
            "remat": False,
        }
    )


def c_unet(out_channels: int = NUM_CLASSES) -> ml_collections.ConfigDict:
    """C-UNet: README best ``unet_vanilla`` with CIN in the encoder (62,562,904 parameters)."""
    return _unet("instance_cond", out_channels)


def unet(out_channels: int = NUM_CLASSES) -> ml_collections.ConfigDict:
    """The same UNet without conditioning (plain affine instance norms everywhere)."""
    return _unet("instance", out_channels)


def _swin(
    feature_size: int, num_heads: int, conditional: bool, out_channels: int
) -> ml_collections.ConfigDict:
    if feature_size % 12 or feature_size % num_heads:
        raise ValueError(f"feature_size={feature_size} must be divisible by 12 and by num_heads={num_heads}.")
    return ml_collections.ConfigDict(
        {
            "name": "swin_unetr",
            "out_channels": out_channels,
            "feature_size": feature_size,
            "num_heads": num_heads,
            "depths": (2, 2, 2, 2),
            "dropout": 0.0,
            "attn_dropout": 0.0,
            "drop_path": 0.0,
            "normalize": True,
            "downsample": "merging",
            "encoder_norm": "instance_cond" if conditional else "instance",
            "vit_norm": "instance_cond" if conditional else "layer",
            "decoder_norm": "instance",
            "norm_affine": True,
            "num_groups": 4,
            "num_modalities": NUM_MODALITIES,
            "conv_impl": "auto",
            "attention_impl": "auto",
            "dtype": None,
            "remat": False,
        }
    )


def c_swin_unetr(
    feature_size: int = 48, num_heads: int = 3, out_channels: int = NUM_CLASSES
) -> ml_collections.ConfigDict:
    """C-Swin-UNETR: CIN in the conv encoder and the Swin transformer (fs48/h3: 62.22 M, fs36/h4: 35.16 M)."""
    return _swin(feature_size, num_heads, True, out_channels)


def swin_unetr(
    feature_size: int = 48, num_heads: int = 3, out_channels: int = NUM_CLASSES
) -> ml_collections.ConfigDict:
    """Swin-UNETR without conditioning (instance norms in the conv blocks, LayerNorm in the transformer)."""
    return _swin(feature_size, num_heads, False, out_channels)


PRESETS = {
    "c_unet": c_unet,
    "unet": unet,
    "c_swin_unetr_fs36": lambda: c_swin_unetr(36, 4),
    "c_swin_unetr_fs48": lambda: c_swin_unetr(48, 3),
    "swin_unetr_fs36": lambda: swin_unetr(36, 4),
    "swin_unetr_fs48": lambda: swin_unetr(48, 3),
}


def get(name: str) -> ml_collections.ConfigDict:
    """The model config of a preset name."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; expected one of {sorted(PRESETS)}.")
    return PRESETS[name]()
