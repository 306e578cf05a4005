"""Training-run checkpoints: an Orbax CheckpointManager over the train state, the data-iterator states and
the run config, plus the SIGTERM/preemption flag.

A step directory `<output_dir>/checkpoints/<step>/` holds:
- `state/`: the train state pytree (params, optimizer state, step, rng), written by all processes,
  each its own shards; restored straight into an abstract *sharded* target, so the mesh shape, the
  device count and the number of hosts may change between save and restore;
- `data/process_<i>-of-<n>.json`: each process's data-iterator state (any JSON value);
- `config/`: the TrainConfig as JSON (primary process).

A step that cannot be read back (a truncated or deleted array file, a broken JSON file, a missing item) is
an `UnreadableCheckpointError` naming the step and the damage; `restore_newest_readable` can then take the
newest earlier step that reads, and moves the unreadable newer ones out of the manager's way.

Differences from the reference: the optimizer state is saved as global sharded arrays rather than
per-rank FSDP LOCAL_STATE_DICTs, so resuming does not need the same world size (docs/reference.md,
"Optimizer state tied to world size").
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lumina_jax import param_checkpoint
from lumina_jax.state import leaf_path_name
from lumina_jax.validation import parse_json

log = logging.getLogger(__name__)

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


# --------------------------------------------------------------------------------------------------------
# per-process data-iterator state


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes its own JSON file; restore returns every process's state.

    Restore result: {"process_count": n, "states": [state of process 0, ..., state of process n-1]}.
    """

    def save(self, directory: epath.Path, args: "DataStateSave"):
        index, count = jax.process_index(), jax.process_count()
        (directory / f"process_{index}-of-{count}.json").write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        found = {}
        for path in directory.iterdir():
            m = _DATA_FILE.match(path.name)
            if m:
                found[int(m.group(1))] = (int(m.group(2)), _read_json(path))
        if not found:
            raise FileNotFoundError(f"{directory}: no process_<i>-of-<n>.json data-iterator states")
        counts = {c for c, _ in found.values()}
        count = counts.pop()
        if counts or sorted(found) != list(range(count)):
            raise ValueError(f"{directory}: incomplete or mixed data-iterator states {sorted(found)}")
        return {"process_count": count, "states": [found[i][1] for i in range(count)]}

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _read_json(path: epath.Path) -> Any:
    return parse_json(path.read_bytes(), str(path))  # a ValueError naming the file


# --------------------------------------------------------------------------------------------------------
# manager


class UnreadableCheckpointError(ValueError):
    """A checkpoint step that cannot be read back: missing, truncated or damaged files."""

    def __init__(self, step: int, directory: epath.Path, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is unreadable: {reason}")
        self.step, self.reason = step, reason


def one_line(error: BaseException, limit: int = 300) -> str:
    """`param_checkpoint.one_line`, also without TensorStore's trailer; a KeyError (whose text is only the key)
    keeps its type name."""
    text = param_checkpoint.one_line(error, 10_000).split("See full TensorStore details")[0].strip()
    if isinstance(error, KeyError):
        text = f"KeyError: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def innermost_line(error: BaseException) -> str:
    """`one_line` of the innermost exception of a chain: Orbax wraps TensorStore's precise message (e.g. a
    byte range past the end of a truncated file) in a generic one."""
    chain, e = [], error
    while e is not None and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return next((one_line(e) for e in reversed(chain) if str(e).strip()), one_line(error))


def _is_closed_loop_callback(unraisable) -> bool:
    """A read Orbax no longer waits for, completing after its failed restore closed the event loop."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))


def _quiet_closed_loop_callbacks() -> None:
    """When one read of an Orbax restore fails, Orbax closes its event loop while TensorStore still completes the
    other reads; each completion then reports "Event loop is closed" as an unraisable exception, dozens of
    tracebacks after the one-line error. Those reports (only those) are dropped; nothing is lost, the restore
    has already failed. Installed once, by the first restore (the reports can precede the failure's return)."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.quiet_closed_loop = True
    sys.unraisablehook = hook


# JSON files of a step directory, by name; they are parsed before a restore so a damaged one is named
_JSON_NAMES = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding", "metadata")


class TrainCheckpointer:
    """Saves/restores (state, data-iterator state, config) at a step interval, keeping the newest few."""

    def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            # the interval only (Orbax's default policy also saves the first step it sees)
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(int(save_interval_steps), 1)),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=False,  # the directory appears with the first save, not when a run that then fails starts
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    def should_save(self, step: int) -> bool:
        """Whether the save policy (every `save_interval_steps`) saves `step`."""
        return self.manager.should_save(int(step))

    def save(self, step: int, state: Any, data_state: Any, config: dict, *, force: bool = False) -> bool:
        """Saves when the policy says so, or always with `force` (the last step, a preemption); returns whether a
        save started."""
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
                                    config=ocp.args.JsonSave(config)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `state` onto the shardings carried by `abstract_state` (ShapeDtypeStructs) and the
        data-iterator states of all processes ({"process_count", "states"}).

        Raises UnreadableCheckpointError for missing or damaged files, and ValueError when the stored arrays
        have other shapes than `abstract_state` (a checkpoint of another model or optimizer)."""
        step = int(step)
        self._check_files(step)
        _quiet_closed_loop_callbacks()
        try:
            stored = self.manager.item_metadata(step)["state"]
            have = _flat_shapes(stored)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged metadata
            raise UnreadableCheckpointError(step, self.directory, f"state metadata: {innermost_line(e)}") from e
        problems = param_checkpoint.shape_mismatches(have, _flat_shapes(abstract_state))
        if problems:
            raise ValueError(f"checkpoint step {step} in {self.directory} holds another model or optimizer state "
                             f"than this config builds: {'; '.join(problems)} (resume with the config it was "
                             f"written with, or use another output_dir)")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                     data=DataStateRestore()))
        except Exception as e:  # noqa: BLE001 - TensorStore, JSON and Orbax errors alike
            raise UnreadableCheckpointError(step, self.directory, innermost_line(e)) from e
        return out["state"], out["data"]

    def _check_files(self, step: int) -> None:
        """Every JSON file of the step parses and the items a resume needs are present (named if not)."""
        root = self.step_directory(step)
        for item in ("state", "data"):
            if not (root / item).is_dir():
                raise UnreadableCheckpointError(step, self.directory, f"{root / item} is missing")
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name in _JSON_NAMES or name.endswith(".json") or os.path.basename(dirpath) == "array_metadatas":
                    try:
                        _read_json(epath.Path(dirpath) / name)
                    except ValueError as e:
                        raise UnreadableCheckpointError(step, self.directory, str(e)) from None

    def set_aside(self, steps: list[int], to_dir: str) -> list[str]:
        """Moves the step directories `steps` into `to_dir` (kept, not deleted: they may still be inspected or
        repaired) so the manager forgets them; returns the new paths."""
        moved = []
        if jax.process_index() == 0:
            os.makedirs(to_dir, exist_ok=True)
            for step in steps:
                target, n = os.path.join(to_dir, str(step)), 1
                while os.path.exists(target):
                    target, n = os.path.join(to_dir, f"{step}.{n}"), n + 1
                os.replace(os.fspath(self.step_directory(step)), target)
                moved.append(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lumina_jax_checkpoints_set_aside")
        self.manager.reload()
        return moved

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {leaf_path_name(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_newest_readable(checkpointer: TrainCheckpointer, restore: Callable[[int], Any], *,
                            fall_back: bool, set_aside_dir: str, flag: str) -> tuple[int, Any]:
    """(step, restore(step)) for the newest step; `restore` raises UnreadableCheckpointError for a bad one.

    A bad newest step is refused with one line naming it, the previous step and `flag`; with `fall_back` the
    earlier steps are tried newest first, and once one reads, the unreadable newer ones are moved to
    `set_aside_dir` (so later saves are not skipped as older than them). Nothing is moved when none reads.
    """
    steps = checkpointer.all_steps()[::-1]
    if not steps:
        raise ValueError(f"{checkpointer.directory}: no checkpoint to resume from")
    bad: list[UnreadableCheckpointError] = []
    for i, step in enumerate(steps):
        try:
            result = restore(step)
        except UnreadableCheckpointError as e:
            if not fall_back:
                earlier = (f"to resume from step {steps[i + 1]}, the previous checkpoint, set {flag}=true (step "
                           f"{step} is then moved to {set_aside_dir})" if i + 1 < len(steps) else
                           "there is no earlier checkpoint to resume from")
                raise UnreadableCheckpointError(e.step, checkpointer.directory, f"{e.reason}; {earlier}") from e
            log.warning("%s; trying the previous checkpoint", e)
            bad.append(e)
            continue
        if bad:
            moved = checkpointer.set_aside([e.step for e in bad], set_aside_dir)
            log.warning("resuming from step %d; unreadable checkpoints moved to %s", step, ", ".join(moved))
        return step, result
    others = "; ".join(f"step {e.step}: {e.reason}" for e in bad[1:])
    raise UnreadableCheckpointError(bad[0].step, checkpointer.directory, f"{bad[0].reason}; no earlier checkpoint "
                                    f"reads either{f' ({others})' if others else ''}; nothing was moved")


def select_data_state(restored: dict, process_index: int, process_count: int) -> Any:
    """This process's data-iterator state, or the whole list when the process count changed.

    With an unchanged process count every process continues its own iterator. Otherwise the data
    pipeline gets every saved state and must re-derive the position (it is a global position in our
    pipeline, so any process's state describes it).
    """
    if restored["process_count"] == process_count:
        return restored["states"][process_index]
    return restored["states"]


# --------------------------------------------------------------------------------------------------------
# preemption


class PreemptionFlag:
    """SIGTERM (a preemption notice) -> save a checkpoint and stop, at the same step on every process.

    Several processes: JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`), which
    jax.distributed.initialize starts with its own SIGTERM notifier and which names one step for all
    processes without a collective in the loop; no Python handler is installed, since it would replace that
    notifier. One process: that service does not exist (it answers False without jax.distributed), so a
    Python SIGTERM handler sets a flag.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        self._distributed = jax.process_count() > 1
        if not self._distributed and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self._event.set()

    def reached(self, step: int) -> bool:
        """True when the run should save `step` and stop; call it at every step (the same steps on every process)."""
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def restore_handlers(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
