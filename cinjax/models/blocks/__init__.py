"""Blocks built from layers: MONAI-style residual units, UNETR blocks, the InfoNCE projection head."""
