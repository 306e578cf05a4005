"""Model FLOPs of the decoder, counted from its config: the MFU figure of training and the AOT tool's report.

A matrix product of an (M, K) by a (K, N) array costs 2 M K N FLOPs. Norms, softmax and the embedding
lookup are left out (they are not matrix products).
"""
from __future__ import annotations

from lumina_jax.config import ChameleonConfig


def matmul_params(cfg: ChameleonConfig) -> int:
    """Parameters that take part in matrix products (everything but the embedding table and norms)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = D * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return L * (attn + 3 * D * F) + D * cfg.vocab_size


def train_flops_per_token(cfg: ChameleonConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one token of a `seq_len`-token row: 6 P (P = `matmul_params`) + 12 L N H T
    (attention scores and values over the whole row, as the causal mask is applied after the product)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
