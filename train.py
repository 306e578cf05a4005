"""Training entry point (arrives with the training issue)."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet")
