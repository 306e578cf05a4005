"""The pure jitted train step (lax.scan gradient accumulation) and the context it closes over.

The train state it updates is built by `lumina_jax.state` ({"step", "params", "opt_state", "rng"}).
Dropout keys are derived, never threaded: key = fold_in(fold_in(rng, step), micro_batch). The dropout mask
is drawn for the whole global (B, T, D) activation with a partitionable PRNG, so every example (and every
data shard) gets different noise while the result does not depend on the mesh (the reference gives every
rank the same dropout stream, so data-parallel replicas drop the same units: docs/reference.md, "Same
dropout on every rank").

Loss normalisation: sum over supervised tokens of CE + z_loss_weight * lse^2 divided by the number of
supervised tokens of the global batch, across micro-batches and devices (so the loss of a step does not
depend on how its rows are split into micro-batches or over devices: docs/reference.md, "Loss averaged per
micro-batch").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lumina_jax import sharding
from lumina_jax.config import ChameleonConfig
from lumina_jax.models.chameleon import Chameleon, compute_logits
from lumina_jax.training.config import LossConfig, TrainConfig
from lumina_jax.training.loss import chunked_loss_sums
from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything the step closes over (static)."""

    model_config: ChameleonConfig
    loss: LossConfig
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    grad_accum_steps: int
    mesh: jax.sharding.Mesh
    rules: tuple  # logical axis rules ((logical, mesh axes), ...)


def make_context(cfg: TrainConfig, mesh: jax.sharding.Mesh, model_config: Optional[ChameleonConfig] = None,
                 ) -> StepContext:
    """The step context of run config `cfg` on `mesh`: rules, optimizer and schedule (train.py, export, AOT).

    `model_config` replaces `cfg.model` (a run initialised from a checkpoint takes its architecture from it).
    """
    rules = sharding.rule_set(cfg.parallel.rules, "parallel.rules")
    return StepContext(model_config or cfg.model, cfg.loss, make_optimizer(cfg.optimizer, cfg.total_steps),
                       learning_rate_schedule(cfg.optimizer, cfg.total_steps), cfg.parallel.grad_accum_steps, mesh,
                       rules)


def make_mesh(cfg: TrainConfig, devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
    """The run's mesh: `parallel.mesh` laid out in each of `parallel.num_slices` slices. train.py and the AOT
    tool both build it here, so a mesh the AOT tool compiles for is one a training run builds."""
    return sharding.make_mesh(cfg.parallel.mesh, devices, num_slices=cfg.parallel.num_slices)


def check_micro_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError unless each micro-batch splits evenly over the batch shards (data x fsdp) of `mesh`."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.data.global_batch_size // cfg.parallel.grad_accum_steps
    if micro % shards:
        raise ValueError(f"micro-batch of {micro} rows (data.global_batch_size={cfg.data.global_batch_size} / "
                         f"parallel.grad_accum_steps={cfg.parallel.grad_accum_steps}) does not divide over the "
                         f"{shards} batch shards (data x fsdp) of mesh {dict(mesh.shape)}")


def batch_sharding(ctx: StepContext) -> NamedSharding:
    return sharding.batch_sharding(ctx.mesh, ctx.rules)


def _split_micro_batches(batch: dict, k: int) -> dict:
    """(B, T) -> (k, B/k, T) with micro-batch i = rows i, i+k, i+2k, ... (keeps each shard's rows local)."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
    return {key: split(v) for key, v in batch.items()}


def make_loss_fn(ctx: StepContext):
    """(params, micro_batch, dropout_key, total_weight) -> (objective / total_weight, metric sums)."""
    cfg = ctx.model_config
    model = Chameleon(cfg)
    logits_fn = lambda head, h: compute_logits(head, h, cfg)
    deterministic = cfg.dropout == 0.0

    def loss_fn(params, mb, key, total_weight):
        hidden = model.apply(
            {"params": params}, mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"],
            deterministic=deterministic, return_hidden=True, rngs=None if deterministic else {"dropout": key},
        )
        objective, sums = chunked_loss_sums(
            {"lm_head": params["lm_head"]}, hidden, mb["targets"], mb["weights"], logits_fn,
            z_loss_weight=cfg.z_loss_weight, chunk_size=ctx.loss.chunk_size, fused_grad=ctx.loss.fused_grad,
        )
        return objective / total_weight, sums

    return loss_fn


def make_grad_fn(ctx: StepContext):
    """(params, batch, step, rng) -> (grads of the normalised loss, metric sums), accumulating
    `grad_accum_steps` micro-batches with lax.scan (fp32 accumulators, token-weighted)."""
    grad_fn = jax.value_and_grad(make_loss_fn(ctx), has_aux=True)
    k = ctx.grad_accum_steps
    mb_sharding = batch_sharding(ctx)

    def grads_and_sums(params, batch, step, rng):
        total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
        micro = _split_micro_batches(batch, k)

        def accumulate(carry, xs):
            grads_acc, sums_acc = carry
            i, mb = xs
            mb = {key: jax.lax.with_sharding_constraint(v, mb_sharding) for key, v in mb.items()}
            (_, sums), grads = grad_fn(params, mb, dropout_key(rng, step, i), total_weight)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
            sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
            return (grads_acc, sums_acc), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_sums = {n: jnp.zeros((), jnp.float32) for n in ("ce_sum", "z_loss_sum", "weight_sum")}
        if k == 1:
            (grads, sums), _ = accumulate((zero_grads, zero_sums), (0, jax.tree.map(lambda x: x[0], micro)))
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (jnp.arange(k), micro))
        return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), sums

    return grads_and_sums


def make_train_step(ctx: StepContext):
    """Returns the pure step (state, batch) -> (state, metrics); jit it with `jit_train_step`."""
    grads_and_sums = make_grad_fn(ctx)
    zw = ctx.model_config.z_loss_weight

    def step_fn(state, batch):
        params = state["params"]
        grads, sums = grads_and_sums(params, batch, state["step"], state["rng"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = ctx.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        w = jnp.maximum(sums["weight_sum"], 1.0)
        metrics = {
            "loss": (sums["ce_sum"] + zw * sums["z_loss_sum"]) / w,
            "ce": sums["ce_sum"] / w,
            "z_loss": sums["z_loss_sum"] / w,
            "grad_norm": grad_norm,
            "lr": ctx.schedule(state["step"]),
            "supervised_tokens": sums["weight_sum"],
            "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
        }
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return step_fn


def jit_train_step(ctx: StepContext, shardings: Any):
    """jax.jit of the step with explicit in/out shardings and the state donated."""
    step_fn = make_train_step(ctx)
    bsh = batch_sharding(ctx)
    replicated = NamedSharding(ctx.mesh, PartitionSpec())
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, {k: bsh for k in BATCH_KEYS}),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with sharding.sharding_context(ctx.mesh, ctx.rules):
            return jitted(state, {k: batch[k] for k in BATCH_KEYS})

    run.jitted = jitted
    return run


def global_batch(ctx: StepContext, local_batch: dict) -> dict:
    """Assembles each process's rows (numpy) into global arrays sharded over the batch axes."""
    bsh = batch_sharding(ctx)
    return {k: jax.make_array_from_process_local_data(bsh, np.asarray(local_batch[k])) for k in BATCH_KEYS}


def dropout_key(rng: jax.Array, step, micro_batch) -> jax.Array:
    """The dropout key of micro-batch `micro_batch` of step `step` (as the step derives it)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), micro_batch)
