"""Test helper: cinjax C-UNet params → an MI-Seg ``unet_vanilla`` state dict (the converter's inverse)."""

import numpy as np
from flax import traverse_util


def unet_state_dict(params) -> dict[str, np.ndarray]:
    """MI-Seg keys and PyTorch layouts for a cinjax ``UNet`` params tree."""
    sd = {}
    for path, v in traverse_util.flatten_dict(params).items():
        v = np.array(v)
        top = path[0]
        if top in ("pre_conv", "out"):
            prefix = f"{top}.conv"
        elif top.startswith("down_"):
            _, k, r = top.split("_")
            prefix = f"down_path.{k}.{r}"
        else:
            prefix = f"up_path.{top.split('_')[1]}.1"
        leaf = {"kernel": "weight", "bias": "bias", "scale": "weight", "negative_slope": "weight"}[path[-1]]
        if path[-1] == "kernel":
            v = np.transpose(v, (4, 3, 0, 1, 2))
        if len(path) == 2:
            sd[f"{prefix}.{leaf}"] = v
        elif path[1] == "residual":
            sd[f"{prefix}.residual.{leaf}"] = v
        elif path[2] == "conv":
            sd[f"{prefix}.conv.{path[1]}.conv.{leaf}"] = v
        elif path[2] == "act":
            sd[f"{prefix}.conv.{path[1]}.adn.A.weight"] = v.reshape(1)
        elif v.ndim == 2:
            for m in range(v.shape[0]):
                sd[f"{prefix}.conv.{path[1]}.adn.N.norms.{m}.{leaf}"] = v[m]
        else:
            sd[f"{prefix}.conv.{path[1]}.adn.N.{leaf}"] = v
    return sd
