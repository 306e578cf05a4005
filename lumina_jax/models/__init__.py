"""Flax modules: the Chameleon decoder and the VQGAN image tokenizer."""
