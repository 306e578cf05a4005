"""Helpers for tests: tiny random models written in the real file formats (nothing is downloaded)."""
