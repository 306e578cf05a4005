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

from lumina_jax.validation import check_float


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
    origin: str = "data config"  # where it was read from (the YAML path), for messages

    @classmethod
    def from_yaml(cls, path: str) -> "DataMix":
        """Parses the YAML file `path`; any mistake is one ValueError (FileNotFoundError) line naming it."""
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a directory, not a data config YAML file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: data config file does not exist")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
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
            if not isinstance(e["path"], str) or not e["path"].strip():
                raise ValueError(f"{source}: META[{i}].path must be a directory name, got {e['path']!r}")
            ratio = e.get("ratio", 1.0)
            try:
                ratio = check_float(f"META[{i}].ratio", ratio, 0.0, lo_open=True)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
            path = os.path.join(base_dir, os.path.expanduser(e["path"]))
            out.append(DataSource(path=os.path.normpath(path), ratio=ratio, type=str(e.get("type", "default"))))
        return cls(tuple(out), origin=source)


def load_data_config(config) -> DataMix:
    """A DataMix from a YAML path, a dict with META, or a DataMix (returned as is)."""
    if isinstance(config, DataMix):
        return config
    if isinstance(config, dict):
        return DataMix.from_dict(config)
    return DataMix.from_yaml(os.fspath(config))
