"""Decoder-only model implementations, one module covering all supported architectures."""
