"""Data: pre-tokenization into tfds ArrayRecord datasets and the grain training input pipeline."""
