"""Training configuration: frozen dataclasses, one file per experiment in `configs/`, dotted overrides.

`configs/<name>.py` defines `get_config() -> TrainConfig`; the command line then applies `key=value`
overrides such as `optimizer.lr=1e-4 parallel.mesh=data=2,fsdp=4 model.dropout=0.0`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from typing import Any

from lumina_jax.config import ChameleonConfig
from lumina_jax.sharding import RULE_SETS
from lumina_jax.validation import SEED_MAX, check_float, check_int


class OverrideError(ValueError):
    """A `key=value` override that is not well formed: no '=', an unknown key, or text its field cannot hold
    (a usage error of the command line, as opposed to a value out of range)."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 2e-5  # peak learning rate (after warm-up)
    min_lr: float = 2e-5  # final learning rate of the cosine decay (reference: equal to lr, i.e. constant)
    warmup_steps: int = 0  # linear warm-up from 0 (the first update uses lr 0, as in the reference)
    decay_steps: int = 0  # step at which the cosine reaches min_lr; 0 = train.total_steps
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon (torch default)
    weight_decay: float = 0.1  # decoupled weight decay (torch AdamW semantics: p -= lr * wd * p)
    decay_norms_biases_embeddings: bool = True  # reference decays every parameter; False excludes norms, biases, embeddings
    clip_grad_norm: float = 4.0  # global L2 gradient clipping threshold; 0 disables clipping


@dataclasses.dataclass(frozen=True)
class LossConfig:
    chunk_size: int = 1024  # sequence positions per chunk of the output-layer + loss computation
    fused_grad: bool = True  # compute lm_head/hidden gradients inside the chunk loop (no logits recomputation)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    config_path: str = ""  # data config YAML listing pre-tokenized ArrayRecord datasets ("" = synthetic data)
    seq_len: int = 4096  # packed sequence length in tokens (must fit one image at the stage's resolution)
    global_batch_size: int = 8  # sequences per optimizer step, over all hosts and micro-batches
    seed: int = 0  # shuffling seed of the data pipeline
    packing: bool = True  # pack several examples per row (best fit); False: one example per row, length-bucketed
    pad_multiple: int = 256  # unpacked rows are padded to a multiple of this (set = seq_len for one fixed shape)
    synthetic_vocab: int = 0  # synthetic data only: token ids drawn from [0, synthetic_vocab); 0 = model vocab


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mesh: str = "fsdp=-1"  # mesh axes of one slice "data=2,fsdp=2,tensor=2"; -1 takes the slice's remaining devices
    num_slices: int = 1  # slices joined over the data-centre network (multi-slice TPU); the data axis spans them
    rules: str = "fsdp"  # logical-axis rule set of lumina_jax.sharding.RULE_SETS ("fsdp" or "tensor")
    grad_accum_steps: int = 1  # micro-batches per optimizer step (accumulated with lax.scan)
    coordinator_address: str = ""  # multi-host: "host:port" of process 0 ("" = single process or env/cluster auto)
    num_processes: int = 0  # multi-host: number of processes (0 = from env / single process)
    process_id: int = -1  # multi-host: index of this process (-1 = from env)
    auto_distributed: bool = False  # call jax.distributed.initialize() with cluster auto-detection (SLURM, k8s, TPU)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_interval_steps: int = 1000  # steps between checkpoints (plus one at the end and on SIGTERM)
    max_to_keep: int = 2  # newest checkpoints kept on disk
    async_save: bool = True  # write checkpoints in a background thread while training continues
    init_from: str = ""  # converted decoder checkpoint dir (params/ + config.json) to start from ("" = random init)
    zero_image_lm_head: bool = False  # reference starting point: zero lm_head columns of the image tokens at init
    resume: bool = True  # continue from the newest checkpoint in train.output_dir when there is one
    resume_from_previous_on_error: bool = False  # newest checkpoint unreadable: resume from the newest readable
    # earlier one (the unreadable ones are moved to <output_dir>/unreadable_checkpoints/); False: refuse


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10  # steps between console/TensorBoard scalar writes
    tensorboard: bool = True  # write TensorBoard event files to <output_dir>/tensorboard
    peak_tflops_per_device: float = 0.0  # for the MFU estimate (0 = guess from the device kind)
    progress_bar: bool = True  # tqdm progress bar on process 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "unnamed"  # experiment name (for logs)
    output_dir: str = ""  # checkpoints, TensorBoard events and exported weights go here
    total_steps: int = 1000  # optimizer steps to run
    seed: int = 0  # seed of parameter init and dropout noise
    model: ChameleonConfig = ChameleonConfig()  # decoder config (dropout, z_loss_weight, dtypes, remat live here)
    optimizer: OptimizerConfig = OptimizerConfig()  # AdamW, schedule, clipping
    loss: LossConfig = LossConfig()  # chunked CE + z-loss
    data: DataConfig = DataConfig()  # input pipeline
    parallel: ParallelConfig = ParallelConfig()  # mesh, accumulation, multi-host
    checkpoint: CheckpointConfig = CheckpointConfig()  # Orbax manager and initialisation
    log: LogConfig = LogConfig()  # metrics

    def __post_init__(self):
        check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Allowed range of each numeric field, by dotted key (check_int / check_float keyword arguments); a field not
# listed takes any finite value of its type. The model's fields are checked by ChameleonConfig itself.
INT_RANGES: dict[str, dict] = {
    "total_steps": dict(lo=1), "seed": dict(lo=0, hi=SEED_MAX), "loss.chunk_size": dict(lo=1),
    "data.seq_len": dict(lo=1), "data.global_batch_size": dict(lo=1), "data.seed": dict(lo=0, hi=SEED_MAX),
    "data.pad_multiple": dict(lo=1), "data.synthetic_vocab": dict(lo=0), "optimizer.warmup_steps": dict(lo=0),
    "optimizer.decay_steps": dict(lo=0), "parallel.num_slices": dict(lo=1), "parallel.grad_accum_steps": dict(lo=1),
    "parallel.num_processes": dict(lo=0), "parallel.process_id": dict(lo=-1),
    "checkpoint.save_interval_steps": dict(lo=1), "checkpoint.max_to_keep": dict(lo=1), "log.every_steps": dict(lo=1),
}
FLOAT_RANGES: dict[str, dict] = {
    "optimizer.lr": dict(lo=0.0), "optimizer.min_lr": dict(lo=0.0), "optimizer.b1": dict(lo=0.0, hi=1.0, hi_open=True),
    "optimizer.b2": dict(lo=0.0, hi=1.0, hi_open=True), "optimizer.eps": dict(lo=0.0),
    "optimizer.weight_decay": dict(lo=0.0), "optimizer.clip_grad_norm": dict(lo=0.0),
    "log.peak_tflops_per_device": dict(lo=0.0),
}


def check(cfg: TrainConfig) -> None:
    """Raises a one-line ValueError naming the field of an inconsistent or nonsensical config."""
    _check_fields(cfg, "")
    d, p = cfg.data, cfg.parallel
    if p.rules not in RULE_SETS:
        raise ValueError(f"parallel.rules={p.rules!r} is unknown; known: {sorted(RULE_SETS)}")
    if d.global_batch_size % p.grad_accum_steps:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                         f"parallel.grad_accum_steps={p.grad_accum_steps}")
    for name in ("weight_quant", "kv_cache_quant"):  # inference-only layouts (no gradients through int8)
        if getattr(cfg.model, name) != "none":
            raise ValueError(f"model.{name}={getattr(cfg.model, name)!r}: quantisation is for inference only; "
                             f"training needs 'none' (the aot tool's generate mode takes generate.{name})")


def _check_fields(section: Any, prefix: str) -> None:
    """Every field holds its declared kind of value (a config file may set anything) within its range; no
    float is NaN or infinite. Nested sections are walked; the model section must be a ChameleonConfig."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, typ, key = getattr(section, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, typ):
                raise ValueError(f"{key} must be a {typ.__name__}, got {type(value).__name__}")
            if typ is not ChameleonConfig:
                _check_fields(value, key + ".")
        elif typ is int:
            check_int(key, value, **INT_RANGES.get(key, {}))
        elif typ is float:
            check_float(key, value, **FLOAT_RANGES.get(key, {}))
        elif typ in (bool, str) and not isinstance(value, typ):
            raise ValueError(f"{key} must be {'true or false' if typ is bool else 'a string'}, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# dotted key=value overrides


def _parse_value(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], key)
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OverrideError(f"override {key}={text}: expected a boolean (true/false)")
    if typ is int:
        return _parse_int(text, key)
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise OverrideError(f"override {key}={text}: expected float") from None
    if typ is str:
        return text
    if origin is tuple:
        (inner, *_rest) = typing.get_args(typ)
        return tuple(_parse_value(t, inner, key) for t in text.split(",") if t)
    raise OverrideError(f"override {key}: unsupported field type {typ}")


def _parse_int(text: str, key: str) -> int:
    """An integer, also written as 2e3; a fraction (1.5), an infinity or NaN is not one."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise OverrideError(f"override {key}={text}: expected int") from None
    if not value.is_integer():  # also False for inf and NaN
        raise OverrideError(f"override {key}={text}: expected int (a whole number)")
    return int(value)


def apply_override(cfg: Any, key: str, text: str, _full_key: str | None = None) -> Any:
    """Returns `cfg` with the dotted field `key` set from the string `text` (parsed by the field's type)."""
    return _apply_tree(cfg, _add_to_tree({}, key, text, _full_key or key))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Applies all overrides, each config section rebuilt once with all of its new fields.

    So a section is validated on the final combination, not after each field (e.g. `model.num_heads=2
    model.num_kv_heads=2` works from 5 heads in either order). A later override of a key wins.
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"override {item!r}: expected key=value")
        key, text = (part.strip() for part in item.split("=", 1))
        _add_to_tree(tree, key, text, key)
    return _apply_tree(cfg, tree)


def _add_to_tree(tree: dict, key: str, text: str, full: str) -> dict:
    """Files `key=text` under its dotted path: {section: {field: (full key, text)}}."""
    node, parts = tree, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise OverrideError(f"override {full}: {part!r} is not a config section")
    node[parts[-1]] = (full, text)
    return tree


def _first_key(value: dict | tuple) -> str:
    """The full key of an override leaf (full key, text), or of the first leaf under a section."""
    return _first_key(next(iter(value.values()))) if isinstance(value, dict) else value[0]


def _apply_tree(cfg: Any, tree: dict) -> Any:
    """`cfg` with the grouped overrides of `tree` applied: one `dataclasses.replace` per section."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for name, value in tree.items():
        full = _first_key(value)
        if name not in fields:
            raise OverrideError(f"override {full}: {type(cfg).__name__} has no field {name!r}; known: {sorted(fields)}")
        current = getattr(cfg, name)
        if isinstance(value, dict):
            if not dataclasses.is_dataclass(current):
                raise OverrideError(f"override {full}: {name!r} is not a config section")
            changes[name] = _apply_tree(current, value)
        elif dataclasses.is_dataclass(current):
            raise OverrideError(f"override {full}: {name!r} is a section; set one of its fields ({name}.<field>=...)")
        else:
            changes[name] = _parse_value(value[1], hints[name], full)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """Imports `path` (a configs/<name>.py defining get_config()) and applies the overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if not path.endswith(".py"):
        raise ValueError(f"{path}: a config is a Python file (configs/<name>.py) defining get_config()")
    spec = importlib.util.spec_from_file_location(f"_train_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config()")
    try:
        cfg = module.get_config()
    except ValueError as e:  # a TrainConfig (or ChameleonConfig) the file builds fails its checks
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"{path}: get_config() returned {type(cfg).__name__}, expected TrainConfig")
    return apply_overrides(cfg, list(overrides))


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuilds a TrainConfig from `to_dict()` output (e.g. the config.json saved beside checkpoints)."""
    def build(cls, values):
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                v = build(t, v)
            elif typing.get_origin(t) is tuple:
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)
    return build(TrainConfig, d)


def fpsft_config(name: str, model: ChameleonConfig, seq_len: int, *, dropout: float, total_steps: int = 20000,
                 global_batch_size: int = 256, init_from: str = "", zero_image_lm_head: bool = False) -> TrainConfig:
    """FP-SFT settings of the reference (its exps/7B.sh), for one stage and model size.

    Step count, batch size per stage and data mix are not published: total_steps and global_batch_size are
    placeholders to set per run (the reference: 8 sequences x 32 GPUs, 2 epochs).
    """
    return TrainConfig(
        name=name,
        total_steps=total_steps,
        model=model.replace(dropout=dropout, z_loss_weight=1e-5, mask_image_logits=False, param_dtype="float32",
                            dtype="bfloat16", remat_policy="full", max_position_embeddings=seq_len),
        # lr = min_lr = 2e-5 as in the reference (so after warm-up the rate is constant); warm-up 1% of the run
        optimizer=OptimizerConfig(lr=2e-5, min_lr=2e-5, warmup_steps=max(total_steps // 100, 1), weight_decay=0.1,
                                  clip_grad_norm=4.0),
        loss=LossConfig(chunk_size=1024),
        data=DataConfig(seq_len=seq_len, global_batch_size=global_batch_size),
        parallel=ParallelConfig(mesh="fsdp=-1", rules="fsdp"),
        checkpoint=CheckpointConfig(save_interval_steps=1000, max_to_keep=2, init_from=init_from,
                                    zero_image_lm_head=zero_image_lm_head),
    )
