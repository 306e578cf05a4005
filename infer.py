"""Inference entry point (arrives with the generation issue)."""
import sys

if __name__ == "__main__":
    sys.exit("infer.py: generation is not implemented yet")
