"""Layers: norms, the 3D conv helper, Swin ops."""
