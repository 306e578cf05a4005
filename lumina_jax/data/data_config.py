"""Training data config: a YAML file like the reference's (`META:` entries with a path and an optional ratio).

    META:
      - path: /data/t2i_512          # a directory written by `python -m lumina_jax.data.pretokenize`
        ratio: 0.5                    # optional, default 1.0: share of the items drawn afresh each epoch
      - path: relative/dir            # relative paths are resolved against the YAML file's directory
        type: default                 # optional, accepted for compatibility with the reference (unused)

A ratio below 1 draws `int(n * ratio)` items without replacement, a new subset each epoch; a ratio above 1
repeats the whole dataset `floor(ratio)` times plus a fresh `int(n * frac(ratio))` subset.
"""
from __future__ import annotations

import dataclasses
import os

import yaml


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # pre-tokenized dataset directory
    ratio: float = 1.0  # per-epoch sampling ratio of this source
    type: str = "default"  # reference compatibility; not used for batching


@dataclasses.dataclass(frozen=True)
class DataMix:
    """The datasets a run draws from and their per-epoch ratios (the parsed data-config YAML).

    Named apart from `training.config.DataConfig`, the TrainConfig section of sequence length and batch size.
    """

    sources: tuple[DataSource, ...]  # the META entries, in file order

    @classmethod
    def from_yaml(cls, path: str) -> "DataMix":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: data config file does not exist")
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        return cls.from_dict(doc, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, doc, source: str = "data config", base_dir: str = ".") -> "DataMix":
        if not isinstance(doc, dict) or "META" not in doc:
            raise ValueError(f"{source}: top-level key 'META' is missing")
        meta = doc["META"]
        if not isinstance(meta, list) or not meta:
            raise ValueError(f"{source}: 'META' must be a non-empty list of entries")
        out = []
        for i, e in enumerate(meta):
            if not isinstance(e, dict) or "path" not in e:
                raise ValueError(f"{source}: META[{i}] has no 'path'")
            unknown = sorted(set(e) - {"path", "ratio", "type"})
            if unknown:
                raise ValueError(f"{source}: META[{i}] has unknown keys {unknown}")
            ratio = e.get("ratio", 1.0)
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0:
                raise ValueError(f"{source}: META[{i}].ratio must be a positive number, got {ratio!r}")
            path = os.path.join(base_dir, os.path.expanduser(str(e["path"])))
            out.append(DataSource(path=os.path.normpath(path), ratio=float(ratio), type=str(e.get("type", "default"))))
        return cls(tuple(out))


def load_data_config(config) -> DataMix:
    """A DataMix from a YAML path, a dict with META, or a DataMix (returned as is)."""
    if isinstance(config, DataMix):
        return config
    if isinstance(config, dict):
        return DataMix.from_dict(config)
    return DataMix.from_yaml(os.fspath(config))
