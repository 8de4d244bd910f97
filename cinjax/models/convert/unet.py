"""Key map MI-Seg ``unet_vanilla`` state dict → :class:`cinjax.models.unet.UNet` params.

MI-Seg keys (tests/data/mi-seg-state-dict-keys.txt, section ``[unet_vanilla_readme_best]``) and their
cinjax paths:

=============================================================  ========================================
``pre_conv.conv.{weight,bias}``                                ``pre_conv/{kernel,bias}``
``down_path.<k>.<r>.conv.unit<u>.conv.{weight,bias}``          ``down_<k>_<r>/unit<u>/conv/{kernel,bias}``
``...unit<u>.adn.N.norms.<m>.{weight,bias}`` (CIN)             row m of ``.../unit<u>/norm/{scale,bias}``
``...unit<u>.adn.N.{weight,bias}`` (plain affine norm)         ``.../unit<u>/norm/{scale,bias}``
``...unit<u>.adn.A.weight`` (PReLU, shape (1,))                ``.../unit<u>/act/negative_slope`` (scalar)
``down_path.<k>.<r>.residual.{weight,bias}``                   ``down_<k>_<r>/residual/{kernel,bias}``
``up_path.<j>.1.…`` (index 0 is the parameter-free Upsample)   ``up_<j>/…``
``out.conv.{weight,bias}``                                     ``out/{kernel,bias}``
=============================================================  ========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from cinjax.models.convert.common import ParamRule, conv_kernel, same, stack_rows


def _scalar(w: np.ndarray) -> np.ndarray:
    """PReLU weight (1,) → scalar; any other size is left as is so the report shows the mismatch."""
    w = np.asarray(w)
    return w.reshape(()) if w.size == 1 else w


def _norm_rules(path: tuple[str, ...], prefix: str, norm: str, num_modalities: int, leaf: str) -> ParamRule:
    """One norm parameter (``scale`` or ``bias``) from MONAI's ADN ``N`` module."""
    torch_leaf = {"scale": "weight", "bias": "bias"}[leaf]
    if norm == "instance_cond":
        keys = tuple(f"{prefix}.adn.N.norms.{m}.{torch_leaf}" for m in range(num_modalities))
        return ParamRule(path, keys, stack_rows)
    return ParamRule(path, (f"{prefix}.adn.N.{torch_leaf}",), same)


def _torch_prefix(module: str) -> str:
    """cinjax top-level module name → MI-Seg module prefix."""
    if module.startswith("down_"):
        _, k, r = module.split("_")
        return f"down_path.{k}.{r}"
    if module.startswith("up_"):
        return f"up_path.{module.split('_')[1]}.1"
    raise KeyError(module)


def mi_seg_rules(model: Any, abstract_params: Mapping[str, Any]) -> list[ParamRule]:
    """Rules that build every parameter of ``model`` (a UNet) from an MI-Seg state dict."""
    for field in ("encoder_norm", "decoder_norm"):
        if getattr(model, field) == "batch":
            raise ValueError(
                f"Converting MI-Seg models with batch norm ({field}='batch') is not supported: "
                "running statistics have no place in the params tree returned by load_mi_seg."
            )
    rules = []
    for path in traverse_util.flatten_dict(dict(abstract_params)):
        top, leaf = path[0], path[-1]
        torch_leaf = {"kernel": "weight", "bias": "bias"}.get(leaf)
        fn = conv_kernel if leaf == "kernel" else same
        if top in ("pre_conv", "out"):
            rules.append(ParamRule(path, (f"{top}.conv.{torch_leaf}",), fn))
            continue
        prefix = _torch_prefix(top)
        if path[1] == "residual":
            rules.append(ParamRule(path, (f"{prefix}.residual.{torch_leaf}",), fn))
            continue
        unit_prefix = f"{prefix}.conv.{path[1]}"
        part = path[2]
        if part == "conv":
            rules.append(ParamRule(path, (f"{unit_prefix}.conv.{torch_leaf}",), fn))
        elif part == "act":
            rules.append(ParamRule(path, (f"{unit_prefix}.adn.A.weight",), _scalar))
        elif part == "norm":
            norm = model.encoder_norm if top.startswith("down_") else model.decoder_norm
            rules.append(_norm_rules(path, unit_prefix, norm, model.num_modalities, leaf))
        else:
            raise KeyError(f"converter bug: unexpected UNet parameter {path}")
    return rules
