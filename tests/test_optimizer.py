"""AdamW + clipping + schedule against torch.optim.AdamW, clip_grad_norm_ and the reference's epoch schedule."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lumina_jax.training.config import OptimizerConfig
from lumina_jax.training.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def reference_lr(step, iters_per_epoch, lr, min_lr, warmup_epochs, epochs):
    """xllmx adjust_learning_rate_epoch at fractional epoch step / iters_per_epoch."""
    e = step / iters_per_epoch
    if e < warmup_epochs:
        return lr * e / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def test_schedule_matches_reference_epoch_formula():
    # 10 iterations per epoch, warm-up 0.3 epochs (3 steps), 2 epochs (20 steps).
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, decay_steps=20)
    sched = learning_rate_schedule(cfg, total_steps=20)
    ours = np.array([float(sched(s)) for s in range(20)])
    ref = np.array([reference_lr(s, 10, 1e-3, 1e-4, 0.3, 2) for s in range(20)])
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    assert ours[0] == 0.0  # the reference's first update has lr 0
    assert float(sched(25)) == pytest.approx(1e-4)  # past the end: min_lr


def _params(rng):
    return {
        "embed_tokens": {"embedding": rng.standard_normal((6, 4)).astype(np.float32)},
        "layers": {"mlp": {"up_proj": {"kernel": rng.standard_normal((4, 5)).astype(np.float32)}},
                   "self_attn": {"q_norm": {"scale": rng.standard_normal((1, 4)).astype(np.float32),
                                            "bias": rng.standard_normal((1, 4)).astype(np.float32)}}},
        "norm": {"scale": rng.standard_normal((4,)).astype(np.float32)},
        "lm_head": {"kernel": rng.standard_normal((4, 6)).astype(np.float32)},
    }


@pytest.mark.parametrize("decay_all", [True, False])
def test_adamw_clip_schedule_match_torch(decay_all):
    rng = np.random.default_rng(0)
    params = _params(rng)
    steps, iters_per_epoch = 8, 4
    cfg = OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=8, b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.1, decay_norms_biases_embeddings=decay_all, clip_grad_norm=4.0)
    grads_seq = [jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 3).astype(np.float32), params)
                 for _ in range(steps)]

    tx = make_optimizer(cfg, total_steps=steps)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads_seq:
        upd, state = update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)

    # torch: named leaves, two groups as the weight-decay mask says
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = jax.tree.leaves(weight_decay_mask(params))
    assert mask.count(False) == 4  # embedding, q_norm scale/bias, norm scale
    tparams = [torch.nn.Parameter(torch.tensor(v)) for _, v in flat]
    decay = [t for t, m in zip(tparams, mask) if m or decay_all]
    no_decay = [t for t, m in zip(tparams, mask) if not (m or decay_all)]
    groups = [{"params": decay, "weight_decay": 0.1}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    for step, g in enumerate(grads_seq):
        lr = reference_lr(step, iters_per_epoch, cfg.lr, cfg.min_lr, 0.5, 2)
        for group in opt.param_groups:
            group["lr"] = lr
        for t, gv in zip(tparams, jax.tree.leaves(g)):
            t.grad = torch.tensor(gv)
        torch.nn.utils.clip_grad_norm_(tparams, 4.0)
        opt.step()

    for (path, _), t, ours in zip(flat, tparams, jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(ours), t.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
