"""The grain training input pipeline: per-epoch ratio sampling, seeded shuffling, host sharding, packing.

    it = make_train_iterator("data.yaml", seq_len=4096, batch_size=8, seed=0,
                             shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)            # dict of (B, T) numpy arrays, see below
    state = it.get_state()      # save beside the model checkpoint; it.set_state(state) continues exactly

Batches (docs/design.md "Training batches"): `inputs` int32, `targets` int32 (label of the next token in the
same segment; 0 where unsupervised), `weights` float32 (1 where supervised), `segment_ids` int32 (0 =
padding, 1.. = examples of the row), `positions` int32 (restart at 0 per segment).

Each item of L tokens becomes L-1 (input, next-label) pairs before packing, exactly the reference's
`logits[:, :-1]` vs `labels[:, 1:]`, so no position is spent on a token that predicts nothing. Items with
more than seq_len + 1 tokens raise an error naming the item (the reference truncates silently).

Order: epoch e uses `np.random.default_rng([seed, e])` to draw each source's subset (ratio) and shuffle the
union; host `shard_index` takes every `shard_count`-th item of that order (all hosts get equally many) and
reads only those. With `packing=True` rows are filled best-fit (grain `BestFitPackIterDataset`); with
`packing=False` items are arranged in length buckets (sorted within windows, batches shuffled) and each batch
is padded to its longest item rounded up to `pad_multiple` (few distinct shapes, so few compilations).

In the bucketed mode the sequence of global batches (`batch_size * shard_count` items) depends only on the
seed and the global batch size, so the saved state (`{"next_index": step}`) is valid for any number of hosts
that splits the same global batch.

Differences from the reference: a bad item is an error, never replaced by its neighbour; resumption restores
the iterator state instead of skipping consumed items; the random streams depend on (seed, epoch) only, not
on the number of hosts, except through the final `shard_index::shard_count` split.
"""
from __future__ import annotations

import functools
import math
import threading

import grain
import grain.experimental as grain_exp
import numpy as np

from lumina_jax.data.data_config import DataMix, load_data_config
from lumina_jax.data.records import PretokenizedDataset

IGNORE = -100
DEFAULT_EPOCHS = 1_000_000  # "forever"; the iterator never ends in practice


class EpochSchedule:
    """Random-access list of (source, record) pairs of this host, epoch after epoch.

    Index i is the (i % per_epoch)-th pair of epoch i // per_epoch. With `group` > 1 (length-bucketed
    batches), consecutive groups of `group` pairs have similar lengths and pairs come in whole groups.
    """

    def __init__(self, sources: list[PretokenizedDataset], ratios: list[float], seed: int, shard_index: int,
                 shard_count: int, num_epochs: int, group: int = 1, bucket_window: int = 256):
        self.sources, self.ratios, self.seed = sources, ratios, seed
        self.shard_index, self.shard_count, self.group = shard_index, shard_count, group
        self.bucket_window = bucket_window
        counts = [math.floor(r) * len(s) + int(len(s) * (r - math.floor(r))) for s, r in zip(sources, ratios)]
        total = sum(counts)
        self.per_epoch = (total // (shard_count * group)) * group
        if self.per_epoch == 0:
            raise ValueError(f"an epoch has {total} items, fewer than shard_count={shard_count} x group={group}")
        self.num_epochs = num_epochs
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.per_epoch * self.num_epochs

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(per_epoch, 2) int64 of (source, record) for this host in epoch `epoch` (the last two are cached)."""
        with self._lock:  # grain reads with several threads
            if epoch not in self._cache:
                if len(self._cache) >= 2:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[epoch] = self._compute_epoch_order(epoch)
            return self._cache[epoch]

    def __getstate__(self):  # picklable for grain worker processes
        d = dict(self.__dict__)
        d["_lock"], d["_cache"] = None, {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _compute_epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for k, (src, ratio) in enumerate(zip(self.sources, self.ratios)):
            n = len(src)
            whole, frac = math.floor(ratio), ratio - math.floor(ratio)
            idx = [np.tile(np.arange(n), whole)]
            if frac > 0:
                idx.append(np.sort(rng.choice(n, int(n * frac), replace=False)))
            idx = np.concatenate(idx).astype(np.int64)
            parts.append(np.stack([np.full_like(idx, k), idx], axis=1))
        pairs = np.concatenate(parts)[rng.permutation(sum(len(p) for p in parts))]
        g = self.group * self.shard_count
        if self.group > 1:  # length buckets: sort inside windows, cut into global batches, shuffle the batches
            lengths = np.empty(len(pairs), np.int64)
            for k, src in enumerate(self.sources):
                sel = pairs[:, 0] == k
                lengths[sel] = src.lengths[pairs[sel, 1]]
            w = g * self.bucket_window
            for start in range(0, len(pairs), w):
                sl = slice(start, start + w)
                pairs[sl] = pairs[sl][np.argsort(lengths[sl], kind="stable")]
            nb = len(pairs) // g
            batches = pairs[: nb * g].reshape(nb, self.shard_count, self.group, 2)[rng.permutation(nb)]
            return batches[:, self.shard_index].reshape(-1, 2)[: self.per_epoch]
        return pairs[self.shard_index::self.shard_count][: self.per_epoch]

    def __getitem__(self, i: int) -> tuple[int, int]:
        epoch, pos = divmod(int(i), self.per_epoch)
        s, r = self.epoch_order(epoch)[pos]
        return int(s), int(r)


def _shifted_example(pair: tuple[int, int], sources: list[PretokenizedDataset], seq_len: int) -> dict:
    s, r = pair
    rec = sources[s][r]
    tokens, labels = rec["tokens"], rec["labels"]
    if tokens.size > seq_len + 1:
        raise ValueError(f"{sources[s].directory}: item id {rec['id']} has {tokens.size} tokens, more than "
                         f"seq_len + 1 = {seq_len + 1}; raise seq_len or filter the data")
    if tokens.size < 2:
        raise ValueError(f"{sources[s].directory}: item id {rec['id']} has {tokens.size} token(s), needs at least 2")
    nxt = labels[1:]
    sup = nxt != IGNORE
    return {"inputs": tokens[:-1].astype(np.int32), "targets": np.where(sup, nxt, 0).astype(np.int32),
            "weights": sup.astype(np.float32)}


def _packed_to_batch(b: dict) -> dict:
    return {"inputs": b["inputs"], "targets": b["targets"], "weights": b["weights"],
            "segment_ids": b["inputs_segment_ids"].astype(np.int32),
            "positions": b["inputs_positions"].astype(np.int32)}


def _pad_batch(examples, seq_len: int, pad_multiple: int) -> dict:
    longest = max(e["inputs"].size for e in examples)
    t = min(seq_len, -(-longest // pad_multiple) * pad_multiple)
    out = {"inputs": np.zeros((len(examples), t), np.int32), "targets": np.zeros((len(examples), t), np.int32),
           "weights": np.zeros((len(examples), t), np.float32), "segment_ids": np.zeros((len(examples), t), np.int32),
           "positions": np.zeros((len(examples), t), np.int32)}
    for i, e in enumerate(examples):
        n = e["inputs"].size
        for k in ("inputs", "targets", "weights"):
            out[k][i, :n] = e[k]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    return out


def make_train_dataset(data_config, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                       shard_count: int = 1, packing: bool = True, num_epochs: int | None = None,
                       num_packing_bins: int | None = None, pad_multiple: int = 256, bucket_window: int = 256,
                       read_threads: int = 4) -> grain.IterDataset:
    """The grain IterDataset of (B, T) training batches of host `shard_index` (see the module docstring)."""
    cfg: DataMix = load_data_config(data_config)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in 0..shard_count-1={shard_count - 1}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    sources = [PretokenizedDataset(s.path) for s in cfg.sources]
    for src in sources:  # open here, in the calling thread, not first in grain's prefetch threads
        src.open()
    schedule = EpochSchedule(sources, [s.ratio for s in cfg.sources], seed, shard_index, shard_count,
                             num_epochs or DEFAULT_EPOCHS, group=1 if packing else batch_size,
                             bucket_window=bucket_window)
    read = functools.partial(_shifted_example, sources=sources, seq_len=seq_len)
    ds = grain.MapDataset.source(schedule).map(read)
    if not packing:
        return ds.batch(batch_size, drop_remainder=True,
                        batch_fn=functools.partial(_pad_batch, seq_len=seq_len, pad_multiple=pad_multiple)
                        ).to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
    ds = grain_exp.BestFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
        num_packing_bins=num_packing_bins or max(2 * batch_size, 16), seed=seed, shuffle_bins=True)
    return ds.batch(batch_size, drop_remainder=True).map(_packed_to_batch)


def make_train_iterator(data_config, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                        shard_count: int = 1, packing: bool = True, **kwargs):
    """A grain DatasetIterator of training batches with `get_state()` / `set_state(state)`."""
    return iter(make_train_dataset(data_config, seq_len, batch_size, seed, shard_index, shard_count, packing,
                                   **kwargs))
