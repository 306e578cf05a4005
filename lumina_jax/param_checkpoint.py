"""Orbax parameter checkpoints: atomic writes and (optionally sharded) restores.

A parameter checkpoint is a directory holding an Orbax `StandardCheckpointer` tree under `params/` and
any JSON side files (model config, conversion metadata) next to it. Writers build the whole directory
under a temporary sibling name and rename it at the end, so a failed run never leaves something that
looks like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_SUBDIR = "params"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not match what the caller expects."""


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `out_dir`; renames it to `out_dir` only if the block succeeds."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory already exists: {out} (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result gets the usual mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(directory: str | os.PathLike, params: Any, host_copy: bool = True) -> None:
    """Writes a parameter pytree (numpy or jax arrays) to `directory/params` with Orbax, synchronously.

    `host_copy=False` skips Orbax's defensive copy of numpy leaves and writes uncompressed, so saving a
    host-resident model needs one copy of it, not two (the converters use this); the on-disk format is the
    same. Safe because nothing mutates the arrays while the synchronous save runs. Leaves must then be
    numpy or jax arrays (the registry holds those two handlers only).
    """
    path = Path(directory).absolute() / PARAMS_SUBDIR
    if host_copy:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params)
            ckptr.wait_until_finished()
        return
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(params))


def one_line_list(items: Sequence[str], limit: int = 12) -> str:
    """"[a, b, ... +N more]": a list short enough for a one-line error."""
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... +{len(items) - limit} more' if len(items) > limit else ''}]"


def shape_mismatches(have: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]]) -> list[str]:
    """Phrases naming the missing, unexpected and mis-shaped keys of `have` against `want`; [] when they agree.

    The one wording of key errors for every parameter loader and converter, e.g. "missing keys [norm/scale]",
    "unexpected keys [extra/w]", "wrong shapes [lm_head/kernel [128, 100] (expected [128, 512])]".
    """
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k} {list(have[k])} (expected {list(want[k])})" for k in want
             if k in have and tuple(have[k]) != tuple(want[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {one_line_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {one_line_list(sorted(unexpected))}")
    if wrong:
        problems.append(f"wrong shapes {one_line_list(wrong)}")
    return problems


def write_json(directory: str | os.PathLike, name: str, obj: Any) -> None:
    with open(Path(directory) / name, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(directory: str | os.PathLike, name: str) -> Any:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {directory} a lumina-jax checkpoint?)")
    with open(path) as f:
        return json.load(f)


def restore_params(directory: str | os.PathLike, target: Any = None) -> Any:
    """Restores `directory/params`.

    `target` is an optional pytree of `jax.ShapeDtypeStruct` (with `.sharding` set for a sharded restore,
    as produced by `jax.eval_shape` plus the sharding rules); without it arrays come back as saved.
    """
    path = Path(directory).absolute() / PARAMS_SUBDIR
    if not path.exists():
        raise CheckpointError(f"{path}: no Orbax parameter tree (is {directory} a lumina-jax checkpoint?)")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, target)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for `tree`, optionally carrying `shardings` (a matching pytree)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
