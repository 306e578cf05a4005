"""`vqgan`: Meta's `vqgan.ckpt` + `vqgan.yaml` -> Orbax; `vqgan-export`: back to a PyTorch state_dict file.

The key table is mechanical (see `lumina_jax.models.vqgan`): `encoder.down.2.block.0.conv1.weight` <->
`encoder/down_2/block_0/conv1/kernel`, conv weights (O, I, kh, kw) <-> (kh, kw, I, O), GroupNorm
`weight` <-> `scale`, `quantize.embedding.weight` <-> `quantize/embedding`.

Strictness: every expected key must be present with the expected shape; keys under `loss.` (the
Lightning VQModel's LPIPS + discriminator, training only) are dropped; anything else is an error. All
problems are named in one error. Which levels carry attention blocks is read from the keys actually
present (the yaml's `attn_resolutions` is not reliable; docs/reference.md#vqgan) and written to `vqgan_config.json`.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

from lumina_jax import param_checkpoint
from lumina_jax.convert import torch_pickle
from lumina_jax.convert.errors import ConversionError
from lumina_jax.image_tokenizer import CONFIG_FILE
from lumina_jax.models.vqgan import VQGANConfig, abstract_params

DROPPED_PREFIXES = ("loss.",)  # training-only modules of the Lightning VQModel
_INDEXED = re.compile(r"^(down|up|block|attn)_(\d+)$")


def flax_to_torch_key(path: tuple[str, ...]) -> str:
    """('encoder', 'down_2', 'block_0', 'conv1', 'kernel') -> 'encoder.down.2.block.0.conv1.weight'."""
    if path == ("quantize", "embedding"):
        return "quantize.embedding.weight"
    parts = []
    for parent, p in zip(("",) + path[:-2], path[:-1]):
        m = _INDEXED.match(p)  # ModuleList entries; `mid.block_1` / `mid.attn_1` are plain attribute names
        parts.extend([m.group(1), m.group(2)] if m and parent != "mid" else [p])
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (3, 2, 0, 1)) if path[-1] == "kernel" else x  # (kh, kw, I, O) -> (O, I, kh, kw)


def to_flax_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (2, 3, 1, 0)) if path[-1] == "kernel" else x  # (O, I, kh, kw) -> (kh, kw, I, O)


def key_table(config: VQGANConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (flax path, torch shape) for every parameter of `config`."""
    table = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
        path = tuple(k.key for k in kp)
        torch_shape = tuple(to_torch_layout(path, np.empty(leaf.shape, np.int8)).shape)
        table[flax_to_torch_key(path)] = (path, torch_shape)
    return table


def attn_resolutions_from_keys(keys: Any, config: VQGANConfig) -> tuple[int, ...]:
    """The `attn_resolutions` implied by the `encoder.down.N.attn.*` / `decoder.up.N.attn.*` keys present."""
    n = len(config.ch_mult)
    enc_res = [config.resolution // 2 ** i for i in range(n)]  # taming: curr_res //= 2 per level
    dec_res = [(config.resolution // 2 ** (n - 1)) * 2 ** (n - 1 - i) for i in range(n)]
    found = set()
    for k in keys:
        m = re.match(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.", k)
        if m and int(m.group(2)) < n:
            found.add((enc_res if m.group(1) == "encoder.down" else dec_res)[int(m.group(2))])
    return tuple(sorted(found, reverse=True))


def params_from_state_dict(state_dict: dict[str, Any], config: VQGANConfig, source: str = "state_dict",
                           progress: bool = False) -> tuple[dict, list[str]]:
    """Checks and converts a VQModel state_dict (tensors or arrays) into the float32 Flax tree.

    Returns (params, dropped keys). Raises ConversionError naming every missing, unexpected or mis-shaped key.
    """
    table = key_table(config)
    dropped = sorted(k for k in state_dict if k.startswith(DROPPED_PREFIXES))
    have = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    problems = param_checkpoint.shape_mismatches(have, {k: shape for k, (_, shape) in sorted(table.items())})
    if problems:
        raise ConversionError(f"{source} does not match the VQGAN config: {'; '.join(problems)}")
    params: dict = {}
    for key, (path, _) in tqdm(sorted(table.items()), desc="vqgan tensors", disable=not progress, unit="tensor"):
        x = torch_pickle.as_numpy(state_dict[key])
        if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise ConversionError(f"{source}: {key} has non-float dtype {x.dtype}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(to_flax_layout(path, x.astype(np.float32)))
    return params, dropped


def state_dict_from_params(params: Any, config: VQGANConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict`: float32 numpy arrays under the taming VQModel keys."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in kp)
        out[flax_to_torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, np.asarray(leaf, np.float32)))
    expected = key_table(config)
    if set(out) != set(expected):
        raise ConversionError(f"parameter tree does not match the VQGAN config: "
                              f"{sorted(set(out) ^ set(expected))[:10]}")
    return dict(sorted(out.items()))


def read_state_dict(path: str, key: str = "state_dict", use_torch: bool = False) -> dict[str, Any]:
    """The `state_dict` of a Lightning checkpoint (or a bare state_dict), read without running its code."""
    obj = torch_pickle.load_with_torch(path) if use_torch else torch_pickle.load_checkpoint(path)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
    if key in obj:
        sd = obj[key]
    elif obj and all(torch_pickle.is_tensor(v) for v in obj.values()):
        sd = obj  # a bare state_dict
    else:
        raise ConversionError(f"{path}: no '{key}' entry (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    if not isinstance(sd, dict) or not all(torch_pickle.is_tensor(v) for v in sd.values()):
        raise ConversionError(f"{path}: '{key}' is not a mapping of names to tensors")
    return dict(sd)


def convert(ckpt_path: str, yaml_path: str, out_dir: str, overwrite: bool = False, use_torch: bool = False,
            state_dict_key: str = "state_dict", progress: bool = True) -> VQGANConfig:
    """vqgan.ckpt + vqgan.yaml -> `out_dir` (`params/` + `vqgan_config.json`); returns the config written."""
    if not os.path.isfile(yaml_path):
        raise ConversionError(f"{yaml_path}: no such file")
    try:
        config = VQGANConfig.from_yaml(yaml_path)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise ConversionError(" ".join(str(e).split())) from None
    sd = read_state_dict(ckpt_path, state_dict_key, use_torch)
    attn = attn_resolutions_from_keys(sd, config)
    if set(attn) != set(config.attn_resolutions):
        print(f"note: {ckpt_path} has attention at resolutions {list(attn)}; {yaml_path} says "
              f"{list(config.attn_resolutions)}; using the checkpoint's")
        config = config.replace(attn_resolutions=attn)
    params, dropped = params_from_state_dict(sd, config, source=f"{ckpt_path}: {state_dict_key}", progress=progress)
    try:
        with param_checkpoint.atomic_directory(out_dir, overwrite=overwrite) as tmp:
            param_checkpoint.save_params(tmp, params)
            param_checkpoint.write_json(tmp, CONFIG_FILE, config.to_dict())
            param_checkpoint.write_json(tmp, "conversion.json", {
                "source_checkpoint": os.path.abspath(ckpt_path), "source_config": os.path.abspath(yaml_path),
                "dropped_keys": len(dropped), "dropped_prefixes": list(DROPPED_PREFIXES)})
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return config


def export(checkpoint_dir: str, out_path: str, yaml_out: str | None = None, overwrite: bool = False) -> None:
    """Orbax VQGAN checkpoint -> Lightning-style `{"state_dict": ...}` file (torch.save; needs torch)."""
    try:
        import torch
    except ImportError:
        raise ConversionError("vqgan-export needs PyTorch to write the file (pip install 'lumina-jax[torch]')") from None

    for p in [out_path] + ([yaml_out] if yaml_out else []):
        if os.path.exists(p) and not overwrite:
            raise ConversionError(f"{p}: already exists (pass --overwrite)")
    try:
        config = VQGANConfig.from_dict(param_checkpoint.read_json(checkpoint_dir, CONFIG_FILE))
        params = param_checkpoint.restore_params(checkpoint_dir, param_checkpoint.abstract_like(abstract_params(config)))
    except param_checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    sd = {k: torch.from_numpy(v) for k, v in state_dict_from_params(params, config).items()}
    tmp = f"{out_path}.tmp-{os.getpid()}"
    torch.save({"state_dict": sd}, tmp)
    os.replace(tmp, out_path)
    if yaml_out:
        with open(yaml_out, "w") as f:
            yaml.safe_dump(config.to_yaml_dict(), f, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "vqgan":
        parser.add_argument("--ckpt", required=True, help="Meta's vqgan.ckpt (PyTorch Lightning file, weights under state_dict)")
        parser.add_argument("--config", required=True, help="the matching vqgan.yaml (model.params with ddconfig)")
        parser.add_argument("--out", required=True, help="output checkpoint directory (params/ + vqgan_config.json)")
        parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        parser.add_argument("--state-dict-key", default="state_dict",
                            help="entry of the checkpoint holding the weights (a bare state_dict is also accepted)")
        parser.add_argument("--torch-load", action="store_true",
                            help="read the file with torch.load(weights_only=True) instead of the built-in "
                                 "restricted reader (needs torch; for legacy non-zip files)")
    else:
        parser.add_argument("--checkpoint", required=True, help="VQGAN checkpoint directory written by the vqgan command")
        parser.add_argument("--out", required=True, help="output file, e.g. vqgan.ckpt ({'state_dict': ...}, torch.save)")
        parser.add_argument("--yaml-out", default=None, help="also write a taming vqgan.yaml here")
        parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    if args.command == "vqgan":
        config = convert(args.ckpt, args.config, args.out, overwrite=args.overwrite, use_torch=args.torch_load,
                         state_dict_key=args.state_dict_key)
        print(f"wrote {args.out} (codebook {config.n_embed}x{config.embed_dim}, downsample x{config.downsample_factor})")
    else:
        export(args.checkpoint, args.out, yaml_out=args.yaml_out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    return 0
