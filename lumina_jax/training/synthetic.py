"""A deterministic in-memory batch source in the training-batch format of docs/design.md.

Used by the tiny CPU configs (data.config_path = ""), the tests and the benchmark. Global batch n is a
pure function of (seed, n); process i of n takes rows [i * B / n, (i + 1) * B / n), so the data does not
depend on the number of processes and the iterator state ({"next_batch": n}) restores on any host count.

Each row packs a few segments (restarting positions, with trailing padding); a segment is an arithmetic
progression of token ids (start, start + d, ...) mod vocab, so a model can learn it quickly.
"""
from __future__ import annotations

import numpy as np


def synthetic_global_batch(seed: int, index: int, batch_size: int, seq_len: int, vocab: int,
                           max_segments: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for b in range(batch_size):
        n_seg = int(rng.integers(1, max_segments + 1))
        used = int(rng.integers(seq_len * 3 // 4, seq_len + 1))  # the rest is padding
        cuts = np.sort(rng.choice(np.arange(2, used - 1), size=n_seg - 1, replace=False)) if n_seg > 1 else []
        bounds = [0, *[int(c) for c in cuts], used]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            n = hi - lo
            start, step = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
            toks = (start + step * np.arange(n + 1)) % vocab
            inputs[b, lo:hi] = toks[:n]
            targets[b, lo:hi - 1] = toks[1:n]  # the last token of a segment has no target
            weights[b, lo:hi - 1] = 1.0
            segment_ids[b, lo:hi] = s
            positions[b, lo:hi] = np.arange(n)
    return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segment_ids,
            "positions": positions}


class SyntheticBatches:
    """Iterator of this process's share of the global batches, with get_state()/set_state()."""

    def __init__(self, *, seed: int, global_batch_size: int, seq_len: int, vocab: int,
                 shard_index: int = 0, shard_count: int = 1):
        if global_batch_size % shard_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of shard_count={shard_count}")
        self.seed, self.batch, self.seq_len, self.vocab = seed, global_batch_size, seq_len, vocab
        self.shard_index, self.shard_count = shard_index, shard_count
        self.next_batch = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        full = synthetic_global_batch(self.seed, self.next_batch, self.batch, self.seq_len, self.vocab)
        self.next_batch += 1
        per = self.batch // self.shard_count
        lo = self.shard_index * per
        return {k: v[lo:lo + per] for k, v in full.items()}

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}

    def set_state(self, state) -> None:
        if isinstance(state, list):  # saved by a different number of processes: the position is global
            state = state[0]
        self.next_batch = int(state["next_batch"])
