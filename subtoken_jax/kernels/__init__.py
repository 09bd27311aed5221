"""Pallas kernels (GPU/TPU; interpret mode on CPU)."""
