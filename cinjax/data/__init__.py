"""Data: datalists, NIfTI I/O, preprocessing cache, transforms, grain pipeline, phantom."""
