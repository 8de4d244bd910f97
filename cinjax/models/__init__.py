"""Models: layers → blocks → nets (C-UNet, C-Swin-UNETR), presets and weight converters.

:func:`build_model` turns a model config (``name`` plus the module's fields) into a Flax module and
:func:`model_config` turns a module back into its config; :data:`MODEL_NAMES` is the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import ml_collections

MODEL_NAMES = ("unet_vanilla", "swin_unetr")


def _model_class(name: str) -> type[nn.Module]:
    if name == "unet_vanilla":
        from cinjax.models.unet import UNet

        return UNet
    if name == "swin_unetr":
        from cinjax.models.swin_unetr import SwinUNETR

        return SwinUNETR
    raise ValueError(f"Unknown model name {name!r}; expected one of {MODEL_NAMES}.")


def _to_plain(v: Any) -> Any:
    """Lists → tuples (hashable module fields), nested ConfigDicts → dicts."""
    if isinstance(v, list | tuple):
        return tuple(_to_plain(i) for i in v)
    if hasattr(v, "to_dict"):
        return {k: _to_plain(i) for k, i in v.to_dict().items()}
    return v


def model_kwargs(model_config: Mapping[str, Any] | Any) -> tuple[str, dict[str, Any]]:
    """Split a model config into its ``name`` and the module's constructor arguments."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "name" not in cfg:
        raise ValueError(f"Model config needs a `name` (one of {MODEL_NAMES}); got keys {sorted(cfg)}.")
    name = cfg.pop("name")
    return name, {k: _to_plain(v) for k, v in cfg.items()}


def build_model(model_config: Mapping[str, Any] | Any) -> nn.Module:
    """Build the Flax module named by ``model_config.name`` from the remaining keys (its fields)."""
    name, kwargs = model_kwargs(model_config)
    cls = _model_class(name)
    fields = set(getattr(cls, "__dataclass_fields__", {})) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} for model {name!r}; valid fields: {sorted(fields)}.")
    return cls(**kwargs)


def model_config(model: nn.Module) -> ml_collections.ConfigDict:
    """The config that :func:`build_model` turns back into ``model``."""
    name = next((n for n in MODEL_NAMES if isinstance(model, _model_class(n))), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} is not a registered model ({MODEL_NAMES}).")
    fields = {k: getattr(model, k) for k in model.__dataclass_fields__ if k not in ("parent", "name")}
    return ml_collections.ConfigDict({"name": name, **fields})
