"""Blocks built from layers: MONAI-style residual units and UNETR blocks."""
