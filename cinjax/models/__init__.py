"""Models: layers → blocks → nets (C-UNet, C-Swin-UNETR) and weight converters."""
