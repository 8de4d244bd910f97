"""Import MI-Seg (and MONAI SwinUNETR) PyTorch weights into cinjax models.

Public API::

    from cinjax.models.convert import load_mi_seg
    model, params = load_mi_seg("best.pt", ["--model_name=unet_vanilla", "--feature_size", "16", ...])
    logits = model.apply({"params": params}, x_ndhwc, modality)

``checkpoint`` is a path to a ``.pt`` file (needs the ``[torch]`` extra) or an already-loaded mapping
``{key: array}`` (raw, under ``"state_dict"``, or with ``model.`` / ``module.`` prefixes).
``mi_seg_args`` is the list of MI-Seg command-line flags the model was trained with (only the model
flags matter; the others are ignored) or a dict ``{flag_dest: value}`` as MI-Seg's parser produces.
Loads are strict by default: a missing, unexpected or mis-shaped key raises
:class:`CheckpointMismatchError` carrying a :class:`LoadReport`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cinjax.models import build_model
from cinjax.models.convert.common import (
    CheckpointMismatchError,
    LoadReport,
    ParamRule,
    apply_rules,
    normalize_state_dict,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "load_mi_seg",
    "load_monai_swin_unetr",
    "mi_seg_args_to_config",
    "parse_mi_seg_args",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("unet_vanilla", "swin_unetr")


# --- MI-Seg's model flags ------------------------------------------------------------------------


def _mi_seg_parser() -> argparse.ArgumentParser:
    """The model flags of MI-Seg's ``utils/parser.py`` with its defaults (docs/mi-seg-spec.md §9)."""
    p = argparse.ArgumentParser(prog="MI-Seg model flags", add_help=False)
    p.add_argument("--model_name", default="unetr")
    p.add_argument("--spatial_dims", type=int, default=3)
    p.add_argument("--in_channels", type=int, default=1)
    p.add_argument("--out_channels", type=int, default=14)
    p.add_argument("--roi_x", type=int, default=96)
    p.add_argument("--roi_y", type=int, default=96)
    p.add_argument("--roi_z", type=int, default=96)
    p.add_argument("--feature_size", type=int, nargs="+", default=[16])
    p.add_argument("--num_heads", type=int, default=12)
    p.add_argument("--strides", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--num_res_units", type=int, default=2)
    p.add_argument("--kernel_size", type=int, default=3)
    p.add_argument("--up_kernel_size", type=int, default=3)
    p.add_argument("--activation", default="prelu")
    p.add_argument("--no_bias", action="store_true")
    p.add_argument("--adn_ordering", default="NDA")
    p.add_argument("--encoder_norm_name", default="instance")
    p.add_argument("--decoder_norm_name", default="instance")
    p.add_argument("--vit_norm_name", default="layer")
    p.add_argument("--encoder_norm_no_affine", action="store_true")
    p.add_argument("--decoder_norm_no_affine", action="store_true")
    p.add_argument("--vit_norm_no_affine", action="store_true")
    p.add_argument("--num_groups", type=int, default=4)
    p.add_argument("--num_styles", type=int, default=2)
    p.add_argument("--dropout_rate", type=float, default=0.0)
    p.add_argument("--attn_drop_rate", type=float, default=0.0)
    p.add_argument("--dropout_path_rate", type=float, default=0.0)
    p.add_argument("--depth_swin_block", type=int, nargs="+", default=[2])
    p.add_argument("--downsample", default="merging")
    p.add_argument("--no_normalize_swin", action="store_true")
    p.add_argument("--use_checkpoint", action="store_true")
    return p


def parse_mi_seg_args(mi_seg_args: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """MI-Seg flags (a list of CLI strings, or a dict of parser dests) → a dict with defaults filled.

    Flags that are not model flags (``--lr``, ``--checkpoint`` …) are ignored (logged), so a full MI-Seg
    command line can be pasted. ``--model`` works as MI-Seg's argparse prefix of ``--model_name``.
    """
    parser = _mi_seg_parser()
    defaults = vars(parser.parse_args([]))
    if isinstance(mi_seg_args, Mapping):
        args = dict(defaults)
        ignored = sorted(k for k in mi_seg_args if k not in defaults)
        args.update({k: v for k, v in mi_seg_args.items() if k in defaults})
    elif isinstance(mi_seg_args, str):
        raise TypeError("mi_seg_args must be a list of flags (e.g. str.split()) or a dict, not a string.")
    else:
        ns, rest = parser.parse_known_args(list(mi_seg_args))
        args, ignored = vars(ns), rest
    if ignored:
        log.info("Ignoring MI-Seg arguments that do not define the model: %s", ignored)
    for key in ("feature_size", "strides", "depth_swin_block"):  # MI-Seg turns a single value into an int
        if isinstance(args[key], int | np.integer):
            args[key] = [int(args[key])]
    return args


def _check_fixed(args: Mapping[str, Any]) -> None:
    """Flags whose non-default values MI-Seg's released models never use and cinjax does not build."""
    fixed = {"spatial_dims": 3, "activation": "prelu", "no_bias": False, "adn_ordering": "NDA"}
    for k, want in fixed.items():
        if args[k] != want:
            raise ValueError(f"--{k}={args[k]!r} is not supported by cinjax (only {want!r}).")


def mi_seg_args_to_config(
    mi_seg_args: Sequence[str] | Mapping[str, Any], *, num_modalities: int | None = None
) -> ml_collections.ConfigDict:
    """The cinjax model config (``name`` + module fields, for :func:`build_model`) of an MI-Seg model."""
    a = parse_mi_seg_args(mi_seg_args)
    _check_fixed(a)
    name = a["model_name"]
    m = int(num_modalities if num_modalities is not None else a["num_styles"])
    if name == "unet_vanilla":
        enc, dec = a["encoder_norm_name"], a["decoder_norm_name"]
        # MI-Seg's CIN ignores `no_affine`; the plain norms honour it. cinjax has one flag for both paths.
        affine = {
            flag: not a[f"{flag}_norm_no_affine"]
            for flag, norm in (("encoder", enc), ("decoder", dec))
            if norm != "instance_cond"
        }
        if len(set(affine.values())) > 1:
            raise ValueError(
                "cinjax's UNet has one `norm_affine` for encoder and decoder norms; MI-Seg flags ask for "
                f"different ones ({affine})."
            )
        channels = tuple(int(c) for c in a["feature_size"])
        return ml_collections.ConfigDict(
            {
                "name": "unet_vanilla",
                "out_channels": int(a["out_channels"]),
                "channels": channels,
                "strides": tuple(int(s) for s in a["strides"]),
                "num_res_units": int(a["num_res_units"]),
                "kernel_size": int(a["kernel_size"]),
                "dropout": float(a["dropout_rate"]),
                "encoder_norm": enc,
                "decoder_norm": dec,
                "norm_affine": next(iter(affine.values()), True),
                "num_groups": int(a["num_groups"]),
                "num_modalities": m,
                "conv_impl": "auto",
                "dtype": None,
                "remat": False,
            }
        )
    if name == "swin_unetr":
        fs = [int(f) for f in a["feature_size"]]
        if len(fs) != 1:
            raise ValueError(f"swin_unetr takes one --feature_size, got {fs}.")
        depths = [int(d) for d in a["depth_swin_block"]]
        if len(depths) == 1:
            depths = depths * 4
        return ml_collections.ConfigDict(
            {
                "name": "swin_unetr",
                "out_channels": int(a["out_channels"]),
                "feature_size": fs[0],
                "num_heads": int(a["num_heads"]),
                "depths": tuple(depths),
                "dropout": float(a["dropout_rate"]),
                "attn_dropout": float(a["attn_drop_rate"]),
                "drop_path": float(a["dropout_path_rate"]),
                "normalize": not a["no_normalize_swin"],
                "downsample": a["downsample"],
                "encoder_norm": a["encoder_norm_name"],
                "vit_norm": a["vit_norm_name"],
                "decoder_norm": a["decoder_norm_name"],
                "norm_affine": True,
                "encoder_norm_affine": not a["encoder_norm_no_affine"],
                "vit_norm_affine": not a["vit_norm_no_affine"],
                "decoder_norm_affine": not a["decoder_norm_no_affine"],
                "num_groups": int(a["num_groups"]),
                "num_modalities": m,
                "conv_impl": "auto",
                "attention_impl": "auto",
                "dtype": None,
                "remat": bool(a["use_checkpoint"]),
                "img_size": (int(a["roi_x"]), int(a["roi_y"]), int(a["roi_z"])),
            }
        )
    raise ValueError(
        f"MI-Seg model {name!r} is not supported; cinjax builds {SUPPORTED_MODELS} "
        "(pass --model_name=unet_vanilla or --model_name=swin_unetr)."
    )


# --- checkpoints ---------------------------------------------------------------------------------


def read_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], *, weights_only: bool = True
) -> dict[str, np.ndarray]:
    """A ``.pt`` path or a loaded mapping → a flat ``{key: numpy array}`` state dict (prefixes stripped).

    ``weights_only=True`` uses PyTorch's safe unpickler; pass False only for files you trust (e.g. a
    Lightning checkpoint whose hyper-parameters hold arbitrary Python objects).
    """
    if isinstance(checkpoint, str | os.PathLike):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                "Reading a PyTorch .pt checkpoint needs torch: pip install 'cinjax[torch]' "
                "(or load it yourself and pass the state-dict mapping)."
            ) from e
        try:
            checkpoint = torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=weights_only)
        except Exception as e:  # torch raises UnpicklingError subclasses that differ across versions
            if not weights_only:
                raise
            raise ValueError(
                f"torch.load(weights_only=True) refused {os.fspath(checkpoint)!r}: {e}\n"
                "If you trust the file, pass weights_only=False."
            ) from e
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"Expected a path or a mapping of arrays, got {type(checkpoint).__name__}.")
    return normalize_state_dict(checkpoint)


# --- model + params --------------------------------------------------------------------------------


def _rules_fn(name: str, source: str, **kw: Any) -> Callable[[Any, Mapping[str, Any]], list[ParamRule]]:
    if name == "unet_vanilla" and source == "mi_seg":
        from cinjax.models.convert.unet import mi_seg_rules

        return mi_seg_rules
    if name == "swin_unetr":
        from cinjax.models.convert import swin_unetr

        if source == "mi_seg":
            return swin_unetr.mi_seg_rules
        return functools.partial(swin_unetr.monai_rules, **kw)
    raise ValueError(f"No {source} converter for model {name!r}.")


# Smallest Swin-UNETR input that every config accepts: divisible by 32, > 1 voxel after the deepest merge.
_SWIN_EXAMPLE_SIZE = (32, 32, 64)


def example_input_shape(model: Any, in_channels: int) -> tuple[int, ...]:
    """A small valid input shape (batch 1) for initialising ``model``; param shapes do not depend on it."""
    if hasattr(model, "total_stride"):
        n = model.total_stride
        return (1, n, n, n, in_channels)
    return (1, *_SWIN_EXAMPLE_SIZE, in_channels)


def _load(
    name: str,
    source: str,
    model_config: ml_collections.ConfigDict,
    in_channels: int,
    checkpoint: Any,
    strict: bool,
    weights_only: bool,
    **rules_kw: Any,
) -> tuple[Any, dict[str, Any], LoadReport]:
    model = build_model(model_config)
    state_dict = read_checkpoint(checkpoint, weights_only=weights_only)
    shape = example_input_shape(model, in_channels)
    x = jnp.zeros(shape, jnp.float32)
    modality = jnp.zeros((shape[0],), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, modality)["params"]
    rules = _rules_fn(name, source, **rules_kw)(model, abstract)
    params, report = apply_rules(rules, state_dict, abstract)
    if not report.ok:
        if strict:
            raise CheckpointMismatchError(report)
        log.warning("Non-strict load; parameters not in the checkpoint keep their init:\n%s", report)
        # rbg: XLA compiles a model init ~5x faster on CPU with it than with threefry.
        init = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, modality)["params"]
        params, report = apply_rules(rules, state_dict, abstract, init_params=init)
    return model, params, report


def load_mi_seg(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    mi_seg_args: Sequence[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    num_modalities: int | None = None,
    return_report: bool = False,
    weights_only: bool = True,
):
    """Build the cinjax model of an MI-Seg run and load its weights.

    Returns ``(model, params)`` (or ``(model, params, report)`` with ``return_report=True``) such that
    ``model.apply({"params": params}, x, modality)`` on NDHWC ``x`` gives MI-Seg's logits in NDHWC.
    ``num_modalities`` overrides ``--num_styles`` (default 2: CT = 0, MR = 1). With ``strict=False``
    mismatches are logged and the affected parameters keep their initial values.
    """
    args = parse_mi_seg_args(mi_seg_args)
    config = mi_seg_args_to_config(args, num_modalities=num_modalities)
    in_channels = int(args["in_channels"])
    model, params, report = _load(
        config.name, "mi_seg", config, in_channels, checkpoint, strict, weights_only
    )
    return (model, params, report) if return_report else (model, params)


def load_monai_swin_unetr(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    in_channels: int = 1,
    strict: bool = True,
    return_report: bool = False,
    weights_only: bool = True,
    source_merging: str = "same",
    **model_kwargs: Any,
):
    """Load a state dict of MONAI's own ``SwinUNETR`` into cinjax's SwinUNETR.

    ``model_kwargs`` are :class:`cinjax.models.swin_unetr.SwinUNETR` fields (``out_channels``,
    ``feature_size``, ``num_heads`` …); unset ones follow MONAI: LayerNorm in the Swin encoder,
    non-affine instance norms in the conv blocks, no modality conditioning. ``source_merging``:
    ``"same"`` for MONAI <= 1.4 ``merging`` (or ``mergingv2``) checkpoints, ``"merging_fixed"`` for
    MONAI >= 1.5 ``merging`` checkpoints loaded into a ``downsample="mergingv2"`` model.
    """
    config = ml_collections.ConfigDict(
        {
            "name": "swin_unetr",
            "vit_norm": "layer",
            "encoder_norm": "instance",
            "decoder_norm": "instance",
            "norm_affine": False,
            "vit_norm_affine": True,
            **model_kwargs,
        }
    )
    model, params, report = _load(
        "swin_unetr",
        "monai",
        config,
        in_channels,
        checkpoint,
        strict,
        weights_only,
        source_merging=source_merging,
    )
    return (model, params, report) if return_report else (model, params)
