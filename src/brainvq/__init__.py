"""brainvq: a VQ-VAE + autoregressive prior that learns brain MRI slices and makes new ones."""

__version__ = "0.1.0"
