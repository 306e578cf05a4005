"""The training loop: mesh, sharded state (fresh, from a converted checkpoint, or resumed), data,
checkpoints, metrics (console + progress bar + TensorBoard + metrics.jsonl), NaN stop, SIGTERM save.

Differences from the reference: a step's metrics are fetched one step late, while the next step runs,
with no extra all-reduces, so the host waits for the device only at checkpoints; the NaN/inf check
still runs before every save, so nothing non-finite is saved; there is no extra checkpoint right after
the first step (docs/reference.md, "Per-step syncs and extra checkpoint").
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lumina_jax import param_checkpoint
from lumina_jax import sharding
from lumina_jax.config import ChameleonConfig
from lumina_jax.data.pipeline import make_train_iterator
from lumina_jax.flops import train_flops_per_token
from lumina_jax.state import abstract_train_state, init_train_state, restore_params, train_state_shardings
from lumina_jax.training import train_step as ts
from lumina_jax.training.train_checkpoint import PreemptionFlag, TrainCheckpointer, select_data_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.synthetic import SyntheticBatches

log = logging.getLogger(__name__)

# Model fields that belong to the experiment, not to the architecture of an init checkpoint.
TRAINING_MODEL_FIELDS = ("dropout", "z_loss_weight", "mask_image_logits", "param_dtype", "dtype", "logits_dtype",
                         "scan_layers", "remat_policy", "max_position_embeddings")

# bf16 dense peak FLOP/s per device, by device_kind substring (for the MFU estimate).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving that state."""


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
    if not d.config_path:
        return SyntheticBatches(seed=d.seed, global_batch_size=d.global_batch_size, seq_len=d.seq_len,
                                vocab=d.synthetic_vocab or model_cfg.vocab_size, shard_index=index, shard_count=count)
    return make_train_iterator(d.config_path, seq_len=d.seq_len, batch_size=local, seed=d.seed, shard_index=index,
                               shard_count=count, packing=d.packing, pad_multiple=d.pad_multiple)


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
        raise ValueError(f"the data-iterator state was saved by {restored['process_count']} processes and this run "
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
    """metrics.jsonl + TensorBoard on process 0."""

    def __init__(self, cfg: TrainConfig):
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")
        if cfg.log.tensorboard:
            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))

    def step(self, step: int, metrics: dict, write_tb: bool) -> None:
        if not self.enabled:
            return
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
    model_cfg = resolve_model_config(cfg)
    mesh = ts.make_mesh(cfg)
    ts.check_micro_batch(cfg, mesh)
    ctx = ts.make_context(cfg, mesh, model_cfg)
    shardings = train_state_shardings(model_cfg, ctx.tx, mesh, ctx.rules)
    checkpointer = TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                     save_interval_steps=cfg.checkpoint.save_interval_steps,
                                     max_to_keep=cfg.checkpoint.max_to_keep, async_save=cfg.checkpoint.async_save)
    data = make_data_iterator(cfg, model_cfg)

    latest = checkpointer.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
        log.info("resuming from step %d in %s", latest, checkpointer.directory)
        target = abstract_train_state(model_cfg, ctx.tx, mesh, ctx.rules)
        state, data_state = checkpointer.restore(latest, target)
        restore_data_state(data, data_state)
        start = int(latest)
    elif cfg.checkpoint.init_from:
        params = restore_params(cfg.checkpoint.init_from, model_cfg, mesh, ctx.rules)
        if cfg.checkpoint.zero_image_lm_head:
            params = zero_image_lm_head(params, model_cfg, shardings["params"])
        state = init_train_state(model_cfg, ctx.tx, mesh, ctx.rules, cfg.seed, params=params)
        start = 0
    else:
        state = init_train_state(model_cfg, ctx.tx, mesh, ctx.rules, cfg.seed)
        start = 0
    sharding.check_replication(state["params"])
    return Run(cfg, ctx, shardings, state, ts.jit_train_step(ctx, shardings), data, checkpointer, start)


def zero_image_lm_head(params, model_cfg: ChameleonConfig, params_sharding):
    """The reference's starting point: lm_head columns of the image tokens set to zero."""
    lo, hi = model_cfg.image_token_start, model_cfg.image_token_end

    def zero(p):
        p = dict(p)
        p["lm_head"] = {"kernel": p["lm_head"]["kernel"].at[:, lo:hi].set(0)}
        return p

    return jax.jit(zero, out_shardings=params_sharding, donate_argnums=0)(params)


def _check_finite(step: int, metrics: dict, checkpointer: TrainCheckpointer) -> None:
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        return
    checkpointer.wait()
    last = checkpointer.latest_step()
    where = f"step {last} in {checkpointer.directory}" if last is not None else "none written yet"
    raise NonFiniteLossError(f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; "
                             f"stopped without saving this state (last good checkpoint: {where})")


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
    `checkpoint.save_interval_steps`, at the last step and on SIGTERM."""
    if not cfg.output_dir:
        raise ValueError("output_dir is empty: set output_dir=<dir> (checkpoints and logs go there)")
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
    state, history, stopped = run.state, [], False
    step = run.start_step
    window = {"tokens": 0.0, "start": time.perf_counter()}
    pending = None  # (step, metrics on device) not yet fetched

    def record() -> None:
        """Fetches the pending step's metrics (normally one step late, while the next step runs), checks, logs."""
        nonlocal pending
        done_step, device_metrics = pending
        pending = None
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(done_step, metrics, run.checkpointer)
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
