"""The training loop: mesh, sharded state (fresh, from a converted checkpoint, or resumed), data,
checkpoints, metrics (console + progress bar + TensorBoard + metrics.jsonl), NaN stop, SIGTERM save.

Everything a run needs is checked before it writes anything (config values, output directory, init
checkpoint, mesh, data, the checkpoint to resume); a mistake there is one `RunError` line naming the key, file
or value, and leaves no directory or file behind.

Differences from the reference: a step's metrics are fetched one step late, while the next step runs,
with no extra all-reduces, so the host waits for the device only at checkpoints; the NaN/inf check (of the
loss, the gradient norm and every array of the updated parameters and optimizer state, computed in the
step) still runs before every save, so nothing non-finite is saved; there is no extra checkpoint right
after the first step (docs/reference.md, "Per-step syncs and extra checkpoint").
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Iterator, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lumina_jax import param_checkpoint
from lumina_jax import sharding
from lumina_jax.config import ChameleonConfig
from lumina_jax.data.pipeline import make_train_iterator
from lumina_jax.flops import train_flops_per_token
from lumina_jax.state import (abstract_train_state, float_leaf_names, init_train_state, names_where_false,
                              nonfinite_leaves, restore_params, train_state_shardings)
from lumina_jax.training import train_step as ts
from lumina_jax.training.train_checkpoint import (PreemptionFlag, TrainCheckpointer, UnreadableCheckpointError,
                                                  one_line, restore_newest_readable, select_data_state)
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.synthetic import SyntheticBatches

log = logging.getLogger(__name__)

# Model fields that belong to the experiment, not to the architecture of an init checkpoint.
TRAINING_MODEL_FIELDS = ("dropout", "z_loss_weight", "mask_image_logits", "param_dtype", "dtype", "logits_dtype",
                         "scan_layers", "remat_policy", "max_position_embeddings")

# bf16 dense peak FLOP/s per device, by device_kind substring (for the MFU estimate).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


class NonFiniteError(FloatingPointError):
    """The loss, the gradient norm or the updated state became NaN/inf; the run stopped without saving it."""


class RunError(ValueError):
    """A run cannot start or go on as configured: a config value, the output directory, the init checkpoint, the
    mesh, the data or the checkpoint to resume is wrong. One line naming the key, file or value."""


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Turns an error of the block into a RunError line that starts with `what` (the key at fault), if given."""
    try:
        yield
    except RunError:
        raise
    except (ValueError, OSError, param_checkpoint.CheckpointError) as e:
        text = one_line(e, limit=2000)  # the parts of a composed message are capped already
        raise RunError(f"{what}: {text}" if what else text) from e


def maybe_initialize_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize from the config flags or the JAX_* environment (before other JAX calls)."""
    p = cfg.parallel
    env = os.environ
    if p.coordinator_address or p.num_processes > 1 or p.auto_distributed or env.get("JAX_COORDINATOR_ADDRESS"):
        sharding.initialize_distributed(p.coordinator_address or None, p.num_processes or None,
                                        None if p.process_id < 0 else p.process_id)


def resolve_model_config(cfg: TrainConfig) -> ChameleonConfig:
    """The experiment's model config; with checkpoint.init_from, the architecture comes from its config.json."""
    if not cfg.checkpoint.init_from:
        return cfg.model
    stored = ChameleonConfig.from_dict(param_checkpoint.read_json(cfg.checkpoint.init_from, "config.json"))
    return stored.replace(**{f: getattr(cfg.model, f) for f in TRAINING_MODEL_FIELDS})


def make_data_iterator(cfg: TrainConfig, model_cfg: ChameleonConfig):
    """This process's share of each global batch: the grain pipeline, or synthetic data without a data config."""
    d = cfg.data
    index, count = jax.process_index(), jax.process_count()
    if d.global_batch_size % count:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not a multiple of the "
                         f"{count} processes")
    local = d.global_batch_size // count
    if d.synthetic_vocab > model_cfg.vocab_size:
        raise ValueError(f"data.synthetic_vocab={d.synthetic_vocab} exceeds the model's vocabulary of "
                         f"{model_cfg.vocab_size} tokens")
    if not d.config_path:
        return SyntheticBatches(seed=d.seed, global_batch_size=d.global_batch_size, seq_len=d.seq_len,
                                vocab=d.synthetic_vocab or model_cfg.vocab_size, shard_index=index, shard_count=count)
    return make_train_iterator(d.config_path, seq_len=d.seq_len, batch_size=local, seed=d.seed, shard_index=index,
                               shard_count=count, packing=d.packing, pad_multiple=d.pad_multiple)


def _data_key(cfg: TrainConfig) -> str:
    return "data.config_path" if cfg.data.config_path else "data (synthetic)"  # the messages name the file


def restore_data_state(iterator, restored: dict) -> None:
    state = select_data_state(restored, jax.process_index(), jax.process_count())
    if isinstance(state, list):  # saved with a different number of processes
        if isinstance(iterator, SyntheticBatches):
            iterator.set_state(state)
            return
        first = state[0]
        if set(first) == {"next_index"} and all(s == first for s in state):
            iterator.set_state(first)  # unpacked batches: the batch index is the same on every host
            return
        raise RunError(f"the data-iterator state was saved by {restored['process_count']} processes and this run "
                         f"has {jax.process_count()}: packed batches cannot move between process counts "
                         f"(use data.packing=false, or the same number of processes)")
    iterator.set_state(state)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def peak_flops_per_device(cfg: TrainConfig) -> float:
    if cfg.log.peak_tflops_per_device > 0:
        return cfg.log.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for key, value in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return value
    return 0.0


class MetricsWriter:
    """metrics.jsonl + TensorBoard on process 0, opened with the first record (a run that fails before its
    first step leaves no empty files)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.jsonl = None

    def _open(self) -> None:
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.cfg.output_dir, "metrics.jsonl"), "a")
        if self.cfg.log.tensorboard:
            self.tb = SummaryWriter(os.path.join(self.cfg.output_dir, "tensorboard"))

    def step(self, step: int, metrics: dict, write_tb: bool) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None and write_tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


@dataclasses.dataclass
class Run:
    """What `setup` builds (also used by tools and tests)."""

    cfg: TrainConfig
    ctx: ts.StepContext
    shardings: Any
    state: Any
    step_fn: Any
    data: Any
    checkpointer: TrainCheckpointer
    start_step: int


def setup(cfg: TrainConfig) -> Run:
    """Builds the run: checks first, then the state (fresh, from `checkpoint.init_from`, or resumed).

    Writes nothing (the checkpoint directory appears with the first save), except that a resume with
    `checkpoint.resume_from_previous_on_error` moves unreadable newer checkpoints aside."""
    check_output_dir(cfg.output_dir)
    with naming(f"checkpoint.init_from={cfg.checkpoint.init_from}"):
        model_cfg = resolve_model_config(cfg)
    with naming(f"parallel.mesh={cfg.parallel.mesh}"):
        mesh = ts.make_mesh(cfg)
    with naming(""):
        ts.check_micro_batch(cfg, mesh)
    ctx = ts.make_context(cfg, mesh, model_cfg)
    shardings = train_state_shardings(model_cfg, ctx.tx, mesh, ctx.rules)
    with naming(_data_key(cfg)):
        data = make_data_iterator(cfg, model_cfg)
    checkpointer = TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                     save_interval_steps=cfg.checkpoint.save_interval_steps,
                                     max_to_keep=cfg.checkpoint.max_to_keep, async_save=cfg.checkpoint.async_save)
    try:
        state, start = _initial_state(cfg, checkpointer, ctx, model_cfg, shardings, data)
    except BaseException:
        checkpointer.close()  # its threads must not outlive the failed run
        raise
    sharding.check_replication(state["params"])
    return Run(cfg, ctx, shardings, state, ts.jit_train_step(ctx, shardings), data, checkpointer, start)


def _initial_state(cfg: TrainConfig, checkpointer: TrainCheckpointer, ctx: ts.StepContext,
                   model_cfg: ChameleonConfig, shardings: Any, data) -> tuple[Any, int]:
    """(state, its step): resumed, from `checkpoint.init_from`, or fresh."""
    existing = checkpointer.all_steps()
    if existing and cfg.checkpoint.resume:
        return _resume(cfg, checkpointer, ctx, model_cfg, data)
    if existing:
        raise RunError(f"checkpoint.resume=false, but {checkpointer.directory} already holds checkpoints (steps "
                       f"{existing}) that a new run would mix with: choose another output_dir")
    if not cfg.checkpoint.init_from:
        return init_train_state(model_cfg, ctx.tx, ctx.mesh, ctx.rules, cfg.seed), 0
    with naming(f"checkpoint.init_from={cfg.checkpoint.init_from}"):
        params = restore_params(cfg.checkpoint.init_from, model_cfg, ctx.mesh, ctx.rules)
    bad = nonfinite_leaves(params)
    if bad:
        raise RunError(f"checkpoint.init_from={cfg.checkpoint.init_from}: {len(bad)} parameter arrays hold NaN "
                       f"or inf {param_checkpoint.one_line_list(bad)}")
    if cfg.checkpoint.zero_image_lm_head:
        params = zero_image_lm_head(params, model_cfg, shardings["params"])
    return init_train_state(model_cfg, ctx.tx, ctx.mesh, ctx.rules, cfg.seed, params=params), 0


RESUME_FLAG = "checkpoint.resume_from_previous_on_error"


def _resume(cfg: TrainConfig, checkpointer: TrainCheckpointer, ctx: ts.StepContext, model_cfg: ChameleonConfig,
            data) -> tuple[Any, int]:
    """The newest readable checkpoint's state (data iterator positioned), by `RESUME_FLAG`'s rule."""
    target = abstract_train_state(model_cfg, ctx.tx, ctx.mesh, ctx.rules)

    def restore(step: int):
        log.info("resuming from step %d in %s", step, checkpointer.directory)
        state, data_state = checkpointer.restore(step, target)
        bad = nonfinite_leaves(state)  # written before saves were checked, or damaged on disk
        if bad:
            raise UnreadableCheckpointError(step, checkpointer.directory, f"{len(bad)} arrays hold NaN or inf "
                                            f"{param_checkpoint.one_line_list(bad)}")
        try:
            restore_data_state(data, data_state)
        except RunError:  # saved by another number of processes: no earlier checkpoint differs in that
            raise
        except Exception as e:  # noqa: BLE001 - valid JSON that is no iterator state: grain raises many types
            raise UnreadableCheckpointError(step, checkpointer.directory,
                                            f"data-iterator state: {one_line(e)}") from e
        return state

    # a plain ValueError (another model's checkpoint, which no earlier one would cure) becomes a RunError too
    with naming(""):
        step, state = restore_newest_readable(
            checkpointer, restore, fall_back=cfg.checkpoint.resume_from_previous_on_error,
            set_aside_dir=os.path.join(cfg.output_dir, "unreadable_checkpoints"), flag=RESUME_FLAG)
    return state, int(step)


def check_output_dir(output_dir: str) -> None:
    """`output_dir` is set and is (or can become) a writable directory; checked before any work."""
    if not output_dir:
        raise RunError("output_dir is empty: set output_dir=<dir> (checkpoints and logs go there)")
    if "://" in output_dir:  # a bucket: the storage layer checks it
        return
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"output_dir={output_dir} is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunError(f"output_dir={output_dir} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"output_dir={output_dir}: {parent} is not writable")


def zero_image_lm_head(params, model_cfg: ChameleonConfig, params_sharding):
    """The reference's starting point: lm_head columns of the image tokens set to zero."""
    lo, hi = model_cfg.image_token_start, model_cfg.image_token_end

    def zero(p):
        p = dict(p)
        p["lm_head"] = {"kernel": p["lm_head"]["kernel"].at[:, lo:hi].set(0)}
        return p

    return jax.jit(zero, out_shardings=params_sharding, donate_argnums=0)(params)


def _check_finite(step: int, metrics: dict, bad_leaves: list[str], n_leaves: int,
                  checkpointer: TrainCheckpointer) -> None:
    """Raises NonFiniteError unless the loss, the gradient norm and every array of the state are finite."""
    loss, gnorm = metrics["loss"], metrics["grad_norm"]
    if math.isfinite(loss) and math.isfinite(gnorm) and not bad_leaves:
        return
    checkpointer.wait()
    last = checkpointer.latest_step()
    where = f"step {last} in {checkpointer.directory}" if last is not None else "none written yet"
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = f"loss={loss} grad_norm={gnorm} is not finite"
    else:
        what = (f"the updated parameters and optimizer state hold NaN or inf in {len(bad_leaves)} of {n_leaves} "
                f"arrays {param_checkpoint.one_line_list(bad_leaves, 4)}, after a finite loss={loss:.6g} "
                f"(grad_norm={gnorm:.6g})")
    raise NonFiniteError(f"step {step}: {what}; stopped without saving this state (last finite checkpoint: {where})")


@dataclasses.dataclass
class TrainResult:
    """What `train` returns."""

    step: int  # the last step run; its checkpoint is the newest
    stopped_by_signal: bool  # SIGTERM / preemption: saved at `step` and stopped before the end
    history: list[dict]  # metrics of every step run in this call, in order ({"step", "loss", ...})
    state: Any  # the final train state (sharded jax arrays)
    run: Run  # what `setup` built (context, mesh, data iterator, checkpointer)

    @property
    def params(self) -> Any:
        return self.state["params"]

    @property
    def model_config(self) -> ChameleonConfig:
        return self.run.ctx.model_config


def train(cfg: TrainConfig, *, max_steps: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) `cfg`, for at most `max_steps` steps in this call; saves every
    `checkpoint.save_interval_steps`, at the last step and on SIGTERM.

    Raises RunError for a mistake in the config, data, mesh, output directory or checkpoints (before anything
    is written when it can be seen in advance), NonFiniteError when a step's loss, gradient norm or updated
    state is not finite (that state is not saved)."""
    run = setup(cfg)
    preempt = PreemptionFlag()
    writer = MetricsWriter(cfg)
    n_params = count_params(run.state["params"])
    fpt = train_flops_per_token(run.ctx.model_config, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg) * jax.device_count()
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, run.start_step + max_steps)
    is_main = jax.process_index() == 0
    bar = tqdm(total=cfg.total_steps, initial=run.start_step, desc=cfg.name, dynamic_ncols=True,
               disable=not (is_main and cfg.log.progress_bar))
    if is_main:
        log.info("%s: %.1fM parameters, mesh %s, steps %d..%d", cfg.name, n_params / 1e6, dict(run.ctx.mesh.shape),
                 run.start_step, end)
    leaf_names = float_leaf_names(ts.checked_state(run.state))
    state, history, stopped = run.state, [], False
    step = run.start_step
    window = {"tokens": 0.0, "start": time.perf_counter()}
    pending = None  # (step, metrics on device) not yet fetched

    def record() -> None:
        """Fetches the pending step's metrics (normally one step late, while the next step runs), checks, logs."""
        nonlocal pending
        done_step, device_metrics = pending
        pending = None
        fetched = jax.device_get(device_metrics)
        bad_leaves = names_where_false(leaf_names, fetched.pop("state_finite"))
        metrics = {k: float(v) for k, v in fetched.items()}
        _check_finite(done_step, metrics, bad_leaves, len(leaf_names), run.checkpointer)
        now = time.perf_counter()
        window["tokens"] += metrics["tokens"]
        metrics["tokens_per_s"] = window["tokens"] / max(now - window["start"], 1e-9)
        metrics["mfu"] = metrics["tokens_per_s"] * fpt / peak if peak else 0.0
        log_now = done_step % cfg.log.every_steps == 0 or done_step == end
        writer.step(done_step, metrics, write_tb=log_now)
        history.append({"step": done_step, **metrics})
        if log_now:
            window.update(tokens=0.0, start=now)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3f}",
                            lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update(1)

    def save(done_step: int, force: bool) -> None:
        """Saves the state of `done_step`, once it is known fit to save (its metrics are fetched and checked
        first, so nothing non-finite is ever written)."""
        record()
        run.checkpointer.save(done_step, state, run.data.get_state(), cfg.to_dict(), force=force)

    try:
        while step < end:
            with naming(_data_key(cfg)):
                local = next(run.data)
            batch = ts.global_batch(run.ctx, local)
            state, metrics = run.step_fn(state, batch)  # dispatched asynchronously
            step += 1
            if pending is not None:
                record()
            pending = (step, metrics)
            stopped = preempt.reached(step)
            if stopped or step == end:  # outside the interval policy: forced
                save(step, force=True)
            elif run.checkpointer.should_save(step):
                save(step, force=False)
            if stopped:
                log.warning("stopping at step %d on a signal; checkpoint saved", step)
                break
        if pending is not None:
            record()
    finally:
        bar.close()
        writer.close()
        run.checkpointer.close()
        preempt.restore_handlers()
    return TrainResult(step=step, stopped_by_signal=stopped, history=history, state=state, run=run)
