"""cinjax: MI-Seg (cross-modality segmentation with Conditional Instance Normalization) in JAX/Flax."""

__version__ = "0.1.0"
