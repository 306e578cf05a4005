"""Training-run checkpoints: an Orbax CheckpointManager over the train state, the data-iterator states and
the run config, plus the SIGTERM/preemption flag.

A step directory `<output_dir>/checkpoints/<step>/` holds:
- `state/`: the train state pytree (params, optimizer state, step, rng), written by all processes,
  each its own shards; restored straight into an abstract *sharded* target, so the mesh shape, the
  device count and the number of hosts may change between save and restore;
- `data/process_<i>-of-<n>.json`: each process's data-iterator state (any JSON value);
- `config/`: the TrainConfig as JSON (primary process).

Differences from the reference: the optimizer state is saved as global sharded arrays rather than
per-rank FSDP LOCAL_STATE_DICTs, so resuming does not need the same world size (docs/reference.md,
"Optimizer state tied to world size").
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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
                found[int(m.group(1))] = (int(m.group(2)), json.loads(path.read_text()))
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


# --------------------------------------------------------------------------------------------------------
# manager


class TrainCheckpointer:
    """Saves/restores (state, data-iterator state, config) at a step interval, keeping the newest few."""

    def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            # the interval only (Orbax's default policy also saves the first step it sees)
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(int(save_interval_steps), 1)),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

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
        data-iterator states of all processes ({"process_count", "states"})."""
        out = self.manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                               data=DataStateRestore()))
        return out["state"], out["data"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
