"""The on-disk format of pre-tokenized data: a tensorflow-datasets dataset in ArrayRecord format, no TensorFlow.

A dataset directory holds what `tfds.builder_from_directory(dir).as_data_source("train")` reads:
`dataset_info.json`, `features.json` and shards `lumina_pretokenized-train.array_record-0000i-of-0000n`, each
record a serialized `tf.train.Example` (written with tfds's own numpy serializer and the protobuf classes
bundled with tfds). Features: `tokens` int32[None], `labels` int32[None] (-100 = unsupervised), `length`
int32, `id` int64 (the item's index in the input JSON). Beside them, `record_index.npz` holds `ids` and
`lengths` of every record in dataset order (so samplers need not read the records).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Sequence

import numpy as np

DATASET_NAME = "lumina_pretokenized"
SPLIT = "train"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
INDEX_FILE = "record_index.npz"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access (tfds uses the same)
# Opening a source imports tensorflow_datasets, whose lazy imports deadlock when several threads (grain's
# prefetch threads) run them for the first time at once; one lock for every dataset of the process.
_OPEN_LOCK = threading.Lock()


def features():
    """The tfds FeaturesDict of one record."""
    import tensorflow_datasets as tfds  # seconds to import: only dataset writing and reading pay for it

    return tfds.features.FeaturesDict({
        "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "length": tfds.features.Scalar(dtype=np.int32),
        "id": tfds.features.Scalar(dtype=np.int64),
    })


def shard_filename(index: int, count: int) -> str:
    return f"{DATASET_NAME}-{SPLIT}.array_record-{index:05d}-of-{count:05d}"


class RecordWriter:
    """Writes serialized examples into one ArrayRecord file (to `path + '.tmp'`, renamed on close)."""

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self._tmp = path + ".tmp"
        self._features = features()
        self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
        self.count = 0

    def write(self, tokens: np.ndarray, labels: np.ndarray, item_id: int) -> None:
        tokens = np.asarray(tokens, np.int32)
        labels = np.asarray(labels, np.int32)
        if tokens.shape != labels.shape or tokens.ndim != 1:
            raise ValueError(f"item {item_id}: tokens {tokens.shape} and labels {labels.shape} must be equal 1-D")
        self._writer.write(self._features.serialize_example(
            {"tokens": tokens, "labels": labels, "length": np.int32(tokens.size), "id": np.int64(item_id)}))
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        fd = os.open(self._tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)


def write_metadata(directory: str, shard_lengths: Sequence[int], ids: np.ndarray, lengths: np.ndarray,
                   description: str = "") -> None:
    """Write dataset_info.json / features.json (tfds) and record_index.npz for finished shards in `directory`."""
    import tensorflow_datasets as tfds

    num_bytes = sum(os.path.getsize(os.path.join(directory, shard_filename(i, len(shard_lengths))))
                    for i in range(len(shard_lengths)))
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[int(n) for n in shard_lengths], num_bytes=num_bytes,
                                filename_template=None)
    tfds.folder_dataset.write_metadata(data_dir=directory, features=features(), split_infos=[split],
                                       filename_template=FILENAME_TEMPLATE, check_data=False,
                                       description=description or "Lumina-mGPT pre-tokenized conversations")
    tmp = os.path.join(directory, INDEX_FILE + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, np.int64), lengths=np.asarray(lengths, np.int64))
    os.replace(tmp, os.path.join(directory, INDEX_FILE))


class PretokenizedDataset:
    """Random access to a pre-tokenized dataset directory: `ds[i] -> {"tokens", "labels", "id"}`, `ds.lengths`."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        info = os.path.join(self.directory, "dataset_info.json")
        if not os.path.isfile(info):
            raise FileNotFoundError(f"{self.directory}: not a finished pre-tokenized dataset (no dataset_info.json)")
        index_path = os.path.join(self.directory, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path}: record index is missing")
        with np.load(index_path) as z:
            self.ids = z["ids"]
            self.lengths = z["lengths"]
        self._source = None

    def open(self):
        """The tfds data source (opened once, under a process-wide lock; safe from any thread)."""
        if self._source is None:
            with _OPEN_LOCK:
                if self._source is None:
                    import tensorflow_datasets as tfds

                    source = tfds.builder_from_directory(self.directory).as_data_source(split=SPLIT)
                    if len(source) != len(self.ids):
                        raise ValueError(f"{self.directory}: {len(source)} records but {len(self.ids)} in "
                                         f"{INDEX_FILE}")
                    self._source = source
        return self._source

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict:
        r = self.open()[int(i)]
        return {"tokens": np.asarray(r["tokens"], np.int32), "labels": np.asarray(r["labels"], np.int32),
                "id": int(r["id"])}

    def __getstate__(self):  # picklable for grain worker processes: reopen lazily
        d = dict(self.__dict__)
        d["_source"] = None
        return d


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` so that a reader (or a killed writer) never sees a partial file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(directory: str, items, records_per_shard: int = 1000, description: str = "") -> str:
    """Write `items` — (tokens, labels) pairs; ids are their positions — as a finished dataset in `directory`.

    For tests and small jobs; `python -m lumina_jax.data.pretokenize` is the resumable writer for real data.
    """
    os.makedirs(directory, exist_ok=True)
    items = list(items)
    n_shards = max(1, -(-len(items) // records_per_shard))
    shard_lengths, ids, lengths = [], [], []
    for s in range(n_shards):
        w = RecordWriter(os.path.join(directory, shard_filename(s, n_shards)))
        for i in range(s * records_per_shard, min(len(items), (s + 1) * records_per_shard)):
            tokens, labels = items[i]
            w.write(tokens, labels, i)
            ids.append(i)
            lengths.append(len(tokens))
        w.close()
        shard_lengths.append(w.count)
    write_metadata(directory, shard_lengths, np.asarray(ids), np.asarray(lengths), description)
    return directory
