"""Sampling: per-row processors (`processors`), the jitted prefill + decode loop (`decode`), and token-level
generation with output splitting and batched image decoding (`generate`). See docs/inference.md."""
