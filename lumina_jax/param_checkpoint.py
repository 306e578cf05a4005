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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from lumina_jax.validation import parse_json

PARAMS_SUBDIR = "params"
OUTPUT_MARKER = "lumina_jax_output.json"  # in every directory atomic_directory writes; --overwrite needs it


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not match what the caller expects."""


def check_outside_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raises unless `out` is neither one of `inputs`, nor lies inside one, nor holds one (links resolved)."""
    o = Path(out).resolve()
    for i in inputs:
        if i is None:
            continue
        r = Path(i).resolve()
        relation = ("is" if o == r else "lies inside" if r in o.parents else "contains" if o in r.parents else None)
        if relation:
            raise CheckpointError(f"{out}: the output {relation} the input {i}; choose an output path outside "
                                  "every input")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Checks, before any work, that `out_dir` may be written; returns it as an absolute path.

    It must not be, hold or lie inside an input. If it exists, `overwrite` must be set and it must be a real
    directory that lumina-jax wrote (it holds OUTPUT_MARKER), so --overwrite never replaces a user's own
    directory, a file or a link.
    """
    out = Path(out_dir).absolute()
    check_outside_inputs(out, inputs)
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise CheckpointError(f"{out}: already exists (pass --overwrite to replace a directory written by "
                                  "lumina-jax)")
        if out.is_symlink() or not out.is_dir():
            raise CheckpointError(f"{out}: is {'a link' if out.is_symlink() else 'not a directory'}; --overwrite "
                                  "replaces only a directory written by lumina-jax")
        if not (out / OUTPUT_MARKER).is_file():
            raise CheckpointError(f"{out}: has no {OUTPUT_MARKER}, so it was not written by lumina-jax and "
                                  "--overwrite will not replace it (move or delete it yourself)")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{out}: cannot be created: {parent} is not a directory")
            break
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yields a temporary directory beside `out_dir`; renames it to `out_dir` only if the block succeeds.

    The result carries OUTPUT_MARKER, the mark that lets a later --overwrite replace it. `check_output_dir`
    rules apply (`inputs`: the paths the command reads; the output may not touch them).
    """
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result gets the usual mode
    try:
        yield tmp
        write_json(tmp, OUTPUT_MARKER, {"written_by": "lumina-jax", "format": 1})
        if out.is_symlink() or out.exists():
            check_output_dir(out, overwrite, inputs)  # again: it may have changed while the block ran
            old = Path(f"{tmp}.old")
            os.replace(out, old)  # keep the old version until the new one is in place
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = (),
                      written_here: Callable[[Path], bool] = lambda p: False) -> Path:
    """The file counterpart of `check_output_dir`: outside the inputs, in an existing directory, and replaced
    only with `overwrite` when `written_here(path)` says lumina-jax wrote it."""
    out = Path(path).absolute()
    check_outside_inputs(out, inputs)
    if not out.parent.is_dir():
        raise CheckpointError(f"{path}: directory {out.parent} does not exist")
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise CheckpointError(f"{path}: already exists (pass --overwrite to replace a file written by lumina-jax)")
        if out.is_symlink() or not out.is_file():
            raise CheckpointError(f"{path}: is {'a link' if out.is_symlink() else 'not a file'}; --overwrite replaces "
                                  "only a file written by lumina-jax")
        if not written_here(out):
            raise CheckpointError(f"{path}: was not written by lumina-jax, so --overwrite will not replace it "
                                  "(move or delete it yourself)")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                written_here: Callable[[Path], bool] = lambda p: False) -> Iterator[Path]:
    """Yields a temporary path beside `path`, renamed to `path` only if the block succeeds."""
    out = check_output_file(path, overwrite, inputs, written_here)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    """`directory/name` parsed as strict JSON (no NaN or Infinity); any problem is one CheckpointError line."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {directory} a lumina-jax checkpoint?)")
    try:
        return parse_json(path.read_bytes(), str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception as one short line: tensorstore's JSON spec dropped, whitespace collapsed, length capped."""
    text = " ".join(str(error).split(" [tensorstore_spec=")[0].split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def params_metadata(directory: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every stored leaf ("a/b/c" paths), read from the checkpoint's metadata alone."""
    path = Path(directory).absolute() / PARAMS_SUBDIR
    if not path.is_dir():
        raise CheckpointError(f"{path}: no Orbax parameter tree (is {directory} a lumina-jax checkpoint?)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            item = ckptr.metadata(path).item_metadata
        if item is None:
            raise CheckpointError(f"{path}: no array metadata (an incomplete or damaged Orbax checkpoint)")
        flat = {"/".join(str(getattr(k, "key", k)) for k in kp): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
                for kp, m in jax.tree_util.tree_flatten_with_path(item.tree)[0]}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({one_line(e)})") from None
    return flat


def restore_params(directory: str | os.PathLike, target: Any = None) -> Any:
    """Restores `directory/params`.

    `target` is an optional pytree of `jax.ShapeDtypeStruct` (with `.sharding` set for a sharded restore,
    as produced by `jax.eval_shape` plus the sharding rules); without it arrays come back as saved. A missing,
    truncated or mis-shaped file is one CheckpointError line naming the directory and the array.
    """
    path = Path(directory).absolute() / PARAMS_SUBDIR
    if not path.exists():
        raise CheckpointError(f"{path}: no Orbax parameter tree (is {directory} a lumina-jax checkpoint?)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(path)
            return ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for damaged files
        raise CheckpointError(f"{path}: unreadable checkpoint ({one_line(e)})") from None


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for `tree`, optionally carrying `shardings` (a matching pytree)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
