"""The paper's model presets as a config file: ``--config configs/models.py:c_swin_unetr_fs48``.

The presets live in :mod:`cinjax.models.presets` (names: ``cinjax.models.presets.PRESETS``).
"""

import ml_collections

from cinjax.models import presets


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The model config of a preset name (default ``c_unet``)."""
    return presets.get(preset or "c_unet")
