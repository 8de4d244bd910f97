"""Shape helpers shared by models, preprocessing and inference: per-axis triples and ROI padding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Triple = tuple[int, int, int]
Padding = tuple[tuple[int, int], ...]


def triple(value: int | Sequence[int], name: str = "value", *, minimum: int = 1) -> Triple:
    """An int or three ints as a 3-tuple of Python ints, each at least ``minimum``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * 3
    items = tuple(value)
    if len(items) != 3 or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= minimum for i in items
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or 3 such ints, got {value!r}.")
    return tuple(int(i) for i in items)  # type: ignore[return-value]


def padding_to(shape: Sequence[int], roi: Sequence[int]) -> Padding:
    """Per-axis ``(before, after)`` zeros that bring each axis up to ``roi``: floor of the difference
    before, ceil after (MONAI ``SpatialPad(method="symmetric")`` and its sliding-window padding)."""
    pads = []
    for size, r in zip(shape, roi):
        diff = max(int(r) - int(size), 0)
        pads.append((diff // 2, diff - diff // 2))
    return tuple(pads)
