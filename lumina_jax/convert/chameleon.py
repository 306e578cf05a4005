"""Hugging Face Chameleon / Lumina-mGPT safetensors <-> lumina-jax Orbax decoder checkpoints.

Commands (see `python -m lumina_jax.convert chameleon --help` and `... chameleon-export --help`):
- `chameleon SRC OUT`: a Hugging Face model directory (config.json plus model.safetensors, or shards with
  model.safetensors.index.json; bf16/fp16/fp32) -> OUT/params (Orbax, scanned layout of docs/design.md),
  OUT/config.json (our ChameleonConfig), OUT/hf_config.json (the source config.json, verbatim) and
  OUT/conversion.json (provenance: source, dtypes, q/k-norm rows, skipped keys).
- `chameleon-export SRC OUT`: such a checkpoint -> a Hugging Face directory; with the default flags the
  tensors are bit-identical to the converted source (same keys, dtypes, shapes and bytes).

The mapping is the literal table `KEY_TABLE` below. All three q/k-norm row formats (docs/reference.md, "QK-norm row formats") convert: the
row count r (1 = Lumina 7B, model-parallel size = Lumina 34B, heads = transformers) is read from the tensors
and kept, so an export writes back exactly what was read. `model.vqmodel.*` (the VQGAN encoder that
transformers bundles) is skipped by an explicit rule and counted: the VQGAN converts with `vqgan`.

Memory: tensors are read one at a time straight into preallocated stacked numpy arrays, so peak host
memory stays near one copy of the model (plus one tensor). Everything is validated from the safetensors
headers before the output directory is created, and the output is built in a temporary directory that is
renamed only on success.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm import tqdm

from lumina_jax import param_checkpoint
from lumina_jax.config import ChameleonConfig
from lumina_jax.convert import hf_config as hfc
from lumina_jax.convert import safetensors_io as sio
from lumina_jax.convert.errors import ConversionError
from lumina_jax.state import param_shapes

LAYER = "{L}"  # placeholder for the layer index in HF key patterns
SKIP_PREFIXES = ("model.vqmodel.",)  # the VQGAN encoder bundled by transformers; converted by `vqgan`
DTYPE_CHOICES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                     np.dtype(np.float16): "float16"}


# ---------------------------------------------------------------------------------------- key table

@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor -> our parameter: either a copy, or a transpose of a torch Linear weight (out, in) to a Flax
    kernel (in, out) followed by a reshape that splits heads (a view: no data moves in the reshape)."""

    name: str
    hf_shape: Callable[[ChameleonConfig], tuple[int, ...]]
    param_shape: Callable[[ChameleonConfig], tuple[int, ...]]
    transpose: bool


def _copy(shape):
    return Transform("copy", shape, shape, transpose=False)


D = lambda c: c.hidden_size  # noqa: E731
F = lambda c: c.intermediate_size  # noqa: E731
V = lambda c: c.vocab_size  # noqa: E731
N = lambda c: c.num_heads  # noqa: E731
H = lambda c: c.head_dim  # noqa: E731
K = lambda c: c.num_kv_heads  # noqa: E731

_Q_IN = Transform("(N*H, D) -> transpose (D, N*H) -> (D, N, H)",
                  lambda c: (N(c) * H(c), D(c)), lambda c: (D(c), N(c), H(c)), transpose=True)
_KV_IN = Transform("(K*H, D) -> transpose (D, K*H) -> (D, K, H)",
                   lambda c: (K(c) * H(c), D(c)), lambda c: (D(c), K(c), H(c)), transpose=True)
_O_OUT = Transform("(D, N*H) -> transpose (N*H, D) -> (N, H, D)",
                   lambda c: (D(c), N(c) * H(c)), lambda c: (N(c), H(c), D(c)), transpose=True)
_UP = Transform("(F, D) -> transpose (D, F)", lambda c: (F(c), D(c)), lambda c: (D(c), F(c)), transpose=True)
_DOWN = Transform("(D, F) -> transpose (F, D)", lambda c: (D(c), F(c)), lambda c: (F(c), D(c)), transpose=True)
_HEAD = Transform("(V, D) -> transpose (D, V)", lambda c: (V(c), D(c)), lambda c: (D(c), V(c)), transpose=True)
_Q_ROWS = _copy(lambda c: (c.q_norm_rows, H(c)))  # rows as stored: 1, model-parallel size, or N
_K_ROWS = _copy(lambda c: (c.k_norm_rows, H(c)))
_NORM = _copy(lambda c: (D(c),))

# HF key pattern -> (our parameter path, transform). Per-layer keys (with {L}) stack on a leading L axis.
KEY_TABLE: dict[str, tuple[str, Transform]] = {
    "model.embed_tokens.weight": ("embed_tokens/embedding", _copy(lambda c: (V(c), D(c)))),
    "model.layers.{L}.self_attn.q_proj.weight": ("layers/self_attn/q_proj/kernel", _Q_IN),
    "model.layers.{L}.self_attn.k_proj.weight": ("layers/self_attn/k_proj/kernel", _KV_IN),
    "model.layers.{L}.self_attn.v_proj.weight": ("layers/self_attn/v_proj/kernel", _KV_IN),
    "model.layers.{L}.self_attn.o_proj.weight": ("layers/self_attn/o_proj/kernel", _O_OUT),
    "model.layers.{L}.self_attn.q_norm.weight": ("layers/self_attn/q_norm/scale", _Q_ROWS),
    "model.layers.{L}.self_attn.q_norm.bias": ("layers/self_attn/q_norm/bias", _Q_ROWS),
    "model.layers.{L}.self_attn.k_norm.weight": ("layers/self_attn/k_norm/scale", _K_ROWS),
    "model.layers.{L}.self_attn.k_norm.bias": ("layers/self_attn/k_norm/bias", _K_ROWS),
    "model.layers.{L}.mlp.gate_proj.weight": ("layers/mlp/gate_proj/kernel", _UP),
    "model.layers.{L}.mlp.up_proj.weight": ("layers/mlp/up_proj/kernel", _UP),
    "model.layers.{L}.mlp.down_proj.weight": ("layers/mlp/down_proj/kernel", _DOWN),
    "model.layers.{L}.input_layernorm.weight": ("layers/input_layernorm/scale", _NORM),
    "model.layers.{L}.post_attention_layernorm.weight": ("layers/post_attention_layernorm/scale", _NORM),
    "model.norm.weight": ("norm/scale", _NORM),
    "lm_head.weight": ("lm_head/kernel", _HEAD),
}


def transpose_into(dest: np.ndarray, src: np.ndarray, block: int = 16) -> None:
    """dest[...] = src.T for 2-D arrays (casting to dest's dtype), in blocks of source rows: 3-4x faster than
    one strided copy for large matrices because each block's reads and writes stay in cache."""
    for i in range(0, src.shape[0], block):
        dest[:, i:i + block] = src[i:i + block].T


def hf_to_param(x: np.ndarray, t: Transform, cfg: ChameleonConfig, dest: np.ndarray) -> None:
    """Writes HF tensor `x` into the (contiguous) parameter slot `dest`."""
    if t.transpose:
        transpose_into(dest.reshape(x.shape[::-1]), x)
    else:
        dest[...] = x


def param_to_hf(y: np.ndarray, t: Transform, cfg: ChameleonConfig, dtype) -> np.ndarray:
    """Our parameter `y` -> a new contiguous HF tensor of `dtype`."""
    hf_shape = tuple(t.hf_shape(cfg))
    out = np.empty(hf_shape, dtype)
    if t.transpose:
        transpose_into(out, np.ascontiguousarray(y).reshape(hf_shape[::-1]))
    else:
        out[...] = y
    return out


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """One HF tensor: where it goes (leaf path, layer index or None) and its expected HF shape."""

    hf_key: str
    path: str
    layer: int | None
    transform: Transform
    hf_shape: tuple[int, ...]


def plan_keys(cfg: ChameleonConfig) -> list[KeyPlan]:
    """Every HF key the config implies, in Hugging Face state-dict order (embeddings, layers, norm, head)."""
    head = [k for k in KEY_TABLE if LAYER not in k and k.startswith("model.embed")]
    tail = [k for k in KEY_TABLE if LAYER not in k and k not in head]
    per_layer = [k for k in KEY_TABLE if LAYER in k]
    order = [(k, None) for k in head] + [(k, i) for i in range(cfg.num_layers) for k in per_layer]
    order += [(k, None) for k in tail]
    plans = []
    for pattern, layer in order:
        path, t = KEY_TABLE[pattern]
        key = pattern if layer is None else pattern.replace(LAYER, str(layer))
        plans.append(KeyPlan(key, path, layer, t, tuple(t.hf_shape(cfg))))
    return plans


def leaf_shapes(cfg: ChameleonConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter paths and shapes (scanned layout), derived from the key table."""
    out = {}
    for pattern, (path, t) in KEY_TABLE.items():
        shape = tuple(t.param_shape(cfg))
        out[path] = ((cfg.num_layers,) + shape) if LAYER in pattern else shape
    return out


def model_leaf_shapes(cfg: ChameleonConfig) -> dict[str, tuple[int, ...]]:
    """The decoder's own parameter shapes (its init's eval_shape, scanned layout), by path."""
    shapes = param_shapes(cfg.replace(scan_layers=True, remat_policy="none"))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes, sep="/").items()}


def _norm_rows(files: sio.ModelFiles, key: str, groups: int) -> int:
    """Row count of a q/k-norm tensor (layer 0); falls back to 1 when absent or malformed (reported later)."""
    info = files.tensors.get(key)
    if info is None or len(info.shape) != 2 or info.shape[0] < 1 or groups % info.shape[0]:
        return 1
    return info.shape[0]


def _check_keys(files: sio.ModelFiles, plans: list[KeyPlan], source: Path) -> dict[str, int]:
    """Raises one ConversionError naming every missing, unexpected and mis-shaped key; returns skip counts."""
    expected = {p.hf_key: p.hf_shape for p in plans}
    skipped = {prefix: 0 for prefix in SKIP_PREFIXES}
    have, non_float = {}, []
    for key, info in files.tensors.items():
        prefix = next((s for s in SKIP_PREFIXES if key.startswith(s)), None)
        if prefix is not None:
            skipped[prefix] += 1
            continue
        have[key] = info.shape
        if key in expected and info.dtype.kind != "f" and info.dtype != np.dtype(ml_dtypes.bfloat16):
            non_float.append(f"{key} {info.dtype_name}")
    problems = param_checkpoint.shape_mismatches(have, expected)
    if non_float:
        problems.append(f"non-float tensors {param_checkpoint.one_line_list(non_float)}")
    if problems:
        raise ConversionError(f"{source}: the weights do not match config.json: {'; '.join(problems)}")
    return skipped


def _read_hf_config(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: malformed JSON ({e})") from None


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None, compute_dtype: str = "bfloat16",
            scan_layers: bool = True, mask_image_logits: bool | None = None, overwrite: bool = False,
            progress: bool = True) -> ChameleonConfig:
    """Hugging Face directory `src` -> lumina-jax checkpoint directory `out`; returns the config written."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: output directory already exists (pass --overwrite to replace it)")
    hf = _read_hf_config(src / "config.json")
    hfc.chameleon_config_from_hf(hf, source=str(src / "config.json"))  # architecture checks before reading weights
    files = sio.ModelFiles(src)
    heads = int(hfc.field(hf, "num_attention_heads"))
    kv_heads = int(hfc.field(hf, "num_key_value_heads"))
    q_rows = _norm_rows(files, "model.layers.0.self_attn.q_norm.weight", heads)
    k_rows = _norm_rows(files, "model.layers.0.self_attn.k_norm.weight", kv_heads)

    plans_probe = plan_keys(hfc.chameleon_config_from_hf(hf, source=str(src / "config.json"),
                                                         q_norm_rows=q_rows, k_norm_rows=k_rows))
    skipped = _check_keys(files, plans_probe, src)

    # Storage dtype per leaf: --dtype, else the source dtype (which must agree across layers).
    source_dtypes: dict[str, set] = {}
    for p in plans_probe:
        source_dtypes.setdefault(p.path, set()).add(files.tensors[p.hf_key].dtype)
    mixed = [f"{path} {sorted(str(d) for d in ds)}" for path, ds in source_dtypes.items() if len(ds) > 1]
    if mixed and dtype is None:
        raise ConversionError(f"{src}: tensors of one parameter have different dtypes across layers "
                              f"{param_checkpoint.one_line_list(mixed)}; pass --dtype")
    leaf_dtype = {path: DTYPE_CHOICES[dtype] if dtype else next(iter(ds)) for path, ds in source_dtypes.items()}
    all_source = sorted({str(d) for ds in source_dtypes.values() for d in ds})
    param_dtype = dtype or (all_source[0] if len(all_source) == 1 else "float32")
    if param_dtype not in DTYPE_CHOICES:
        raise ConversionError(f"{src}: source dtype {param_dtype} is not supported; pass --dtype")
    cfg = hfc.chameleon_config_from_hf(
        hf, source=str(src / "config.json"), q_norm_rows=q_rows, k_norm_rows=k_rows, param_dtype=param_dtype,
        dtype=compute_dtype, scan_layers=scan_layers, mask_image_logits=mask_image_logits)
    plans = plan_keys(cfg)

    shapes = leaf_shapes(cfg)
    model_shapes = model_leaf_shapes(cfg)
    if shapes != model_shapes:
        raise RuntimeError(f"internal: KEY_TABLE shapes {shapes} differ from the decoder's {model_shapes}")

    with param_checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
        leaves = {path: np.empty(shape, leaf_dtype[path]) for path, shape in shapes.items()}
        total = sum(files.tensors[p.hf_key].nbytes for p in plans)
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress,
                  file=sys.stderr) as bar:
            for p in plans:
                dest = leaves[p.path] if p.layer is None else leaves[p.path][p.layer]
                hf_to_param(files.read(p.hf_key), p.transform, cfg, dest)
                bar.update(files.tensors[p.hf_key].nbytes)
        param_checkpoint.save_params(tmp, unflatten_dict(leaves, sep="/"), host_copy=False)
        del leaves
        param_checkpoint.write_json(tmp, "config.json", cfg.to_dict())
        shutil.copyfile(src / "config.json", tmp / "hf_config.json")
        param_checkpoint.write_json(tmp, "conversion.json", {
            "source": str(src.absolute()),
            "source_files": files.files,
            "source_dtypes": all_source,
            "stored_dtype": param_dtype if dtype or len(all_source) == 1 else "per-leaf (source)",
            "q_norm_rows": q_rows,
            "k_norm_rows": k_rows,
            "tensors_converted": len(plans),
            "skipped_key_prefixes": skipped,
        })
    return cfg


# ------------------------------------------------------------------------------------------- export

def export(src: str | Path, out: str | Path, *, dtype: str | None = None, max_shard_size: str | int = "5GB",
           hf_config_path: str | Path | None = None, qk_norm_rows: str = "stored", overwrite: bool = False,
           progress: bool = True) -> list[str]:
    """lumina-jax checkpoint `src` -> Hugging Face directory `out` (config.json + safetensors); returns file names."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: output directory already exists (pass --overwrite to replace it)")
    limit = sio.parse_size(max_shard_size)
    try:
        cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(src, "config.json"))
    except (param_checkpoint.CheckpointError, ValueError, TypeError) as e:
        raise ConversionError(f"{src / 'config.json'}: {e}") from None
    if hf_config_path is not None:
        hf = _read_hf_config(Path(hf_config_path))
        hf_source = str(hf_config_path)
    elif (src / "hf_config.json").is_file():
        hf = _read_hf_config(src / "hf_config.json")
        hf_source = str(src / "hf_config.json")
    else:
        hf, hf_source = None, None
    if hf is not None:
        hfc.chameleon_config_from_hf(hf, source=hf_source, q_norm_rows=cfg.q_norm_rows, k_norm_rows=cfg.k_norm_rows)
        hfc.check_hf_config_matches(hf, cfg, hf_source)

    try:
        params = param_checkpoint.restore_params(src)
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    flat = {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}
    del params
    problems = param_checkpoint.shape_mismatches({k: v.shape for k, v in flat.items()}, leaf_shapes(cfg))
    if problems:
        raise ConversionError(f"{src}: parameters do not match config.json: {'; '.join(problems)}")

    export_cfg = cfg
    if qk_norm_rows == "heads":
        export_cfg = cfg.replace(q_norm_rows=cfg.num_heads, k_norm_rows=cfg.num_kv_heads)
    elif qk_norm_rows != "stored":
        raise ConversionError(f"--qk-norm-rows: expected 'stored' or 'heads', got {qk_norm_rows!r}")

    def producer(plan: KeyPlan, out_dtype):
        def produce():
            leaf = flat[plan.path] if plan.layer is None else flat[plan.path][plan.layer]
            if plan.path.endswith(("q_norm/scale", "q_norm/bias", "k_norm/scale", "k_norm/bias")):
                rows = export_cfg.q_norm_rows if "/q_norm/" in plan.path else export_cfg.k_norm_rows
                leaf = np.repeat(leaf, rows // leaf.shape[0], axis=0)  # expand shared rows to heads
            return param_to_hf(leaf, plan.transform, export_cfg, out_dtype)
        return produce

    specs = []
    for p in plan_keys(export_cfg):
        out_dtype = DTYPE_CHOICES[dtype] if dtype else flat[p.path].dtype
        specs.append(sio.TensorSpec(p.hf_key, np.dtype(out_dtype), p.hf_shape, producer(p, out_dtype)))
    out_dtypes = sorted({TORCH_DTYPE_NAMES.get(s.dtype, str(s.dtype)) for s in specs})
    torch_dtype = out_dtypes[0] if len(out_dtypes) == 1 else "float32"
    if hf is None:
        hf = hfc.hf_config_from_chameleon(export_cfg, torch_dtype)
    else:
        hf = dict(hf)
        for key in ("torch_dtype", "dtype"):
            if key in hf and hf[key] != torch_dtype:
                hf[key] = torch_dtype

    with param_checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
        with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="export",
                  disable=not progress, file=sys.stderr) as bar:
            names = sio.write_model(tmp, specs, limit, metadata={"format": "pt"},
                                    on_tensor=lambda s: bar.update(s.nbytes))
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")
    return names


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if command == "chameleon":
        parser.description = (
            "Convert a Hugging Face Chameleon / Lumina-mGPT model directory (config.json and model.safetensors or\n"
            "sharded *.safetensors with model.safetensors.index.json; fp32, bf16 or fp16) to a lumina-jax\n"
            "checkpoint: OUT/params (Orbax, scanned layout), OUT/config.json, OUT/hf_config.json (the source\n"
            "config.json verbatim) and OUT/conversion.json. q/k-norm tensors with 1, model-parallel-size or\n"
            "num_heads rows are all accepted and kept as stored. model.vqmodel.* keys are skipped (convert the\n"
            "VQGAN with the `vqgan` command). Nothing is written unless the whole conversion succeeds.")
        parser.add_argument("src", help="Hugging Face model directory (holds config.json and the safetensors)")
        parser.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
        parser.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), default=None,
                            help="storage dtype of the parameters (default: keep the source file's dtype)")
        parser.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                            help="activation/matmul dtype written to config.json `dtype` (default: bfloat16)")
        parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                            help="write scan_layers=false to config.json (the stored layout stays scanned; "
                                 "loaders unstack it)")
        parser.add_argument("--mask-image-logits", choices=["auto", "true", "false"], default="auto",
                            help="image-logit masking in config.json: auto = the source's Lumina "
                                 "`mask_image_logits` field, else true as in transformers (must be false to "
                                 "generate images)")
        parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    elif command == "chameleon-export":
        parser.description = (
            "Export a lumina-jax decoder checkpoint (written by `chameleon` or by training) to a Hugging Face\n"
            "directory: config.json (the stored hf_config.json, or --hf-config, or one built from the\n"
            "checkpoint's config.json) and model.safetensors or shards with model.safetensors.index.json.\n"
            "With the default flags the tensors are bit-identical to the converted source's (model.vqmodel.*\n"
            "excepted: it was never converted).")
        parser.add_argument("src", help="lumina-jax checkpoint directory (params/ and config.json)")
        parser.add_argument("out", help="output Hugging Face directory (must not exist unless --overwrite)")
        parser.add_argument("--dtype", choices=sorted(DTYPE_CHOICES), default=None,
                            help="dtype of the written tensors (default: the checkpoint's dtype per parameter)")
        parser.add_argument("--max-shard-size", default="5GB",
                            help="largest safetensors file, e.g. 5GB, 500MiB or a byte count (default: 5GB); "
                                 "more than one file adds model.safetensors.index.json")
        parser.add_argument("--hf-config", default=None,
                            help="config.json to write instead of the checkpoint's stored hf_config.json "
                                 "(must describe the same architecture)")
        parser.add_argument("--qk-norm-rows", choices=["stored", "heads"], default="stored",
                            help="q/k-norm rows to write: stored = as in the checkpoint (bit-identical round "
                                 "trip; Lumina files have 1 or model-parallel-size rows), heads = one row per "
                                 "head, the layout stock transformers loads")
        parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    else:
        raise ValueError(f"unknown command {command!r}")


def run(args: argparse.Namespace) -> int:
    if args.command == "chameleon":
        mask = {"auto": None, "true": True, "false": False}[args.mask_image_logits]
        cfg = convert(args.src, args.out, dtype=args.dtype, compute_dtype=args.compute_dtype,
                      scan_layers=args.scan_layers, mask_image_logits=mask, overwrite=args.overwrite,
                      progress=args.progress)
        print(f"wrote {args.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"q/k-norm rows {cfg.q_norm_rows}/{cfg.k_norm_rows}, params {cfg.param_dtype}")
    else:
        names = export(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       hf_config_path=args.hf_config, qk_norm_rows=args.qk_norm_rows, overwrite=args.overwrite,
                       progress=args.progress)
        print(f"wrote {args.out}: {len(names)} safetensors file(s)")
    return 0
