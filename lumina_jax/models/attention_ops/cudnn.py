"""GPU attention with cuDNN's fused flash attention, through `jax.nn.dot_product_attention`.

Why this and not tokamax's GPU kernels: it is part of the JAX we already pin (no new dependency), it is
the path NVIDIA and JAX maintain and MaxText uses on GPU, it handles grouped-query heads and the causal
mask natively (skipping the blocks above the diagonal) forward and backward. tokamax would add a young
package and the ones it requires that we do not pin (einshape, jaxtyping, qwix, typeguard, cuequivariance)
for the same cuDNN call plus Triton/Mosaic-GPU kernels that cannot be run or tested on a CPU-only host.

Packed segment ids: the public API has no segment input, so they become a boolean (B, 1, T, T) mask,
which cuDNN reads as a bias in the compute dtype: T x T per sequence (32 MiB at 4096 tokens in bf16),
not the float32 (N, T, T) per layer of the dense path. cuDNN supports float16/bfloat16 only.
"""
from __future__ import annotations

from typing import Optional

import jax

Array = jax.Array


def cudnn_attention(q: Array, k: Array, v: Array, segments: Optional[Array] = None, *,
                    implementation: str = "cudnn") -> Array:
    """Causal self-attention q (B, T, N, H), k and v (B, T, K, H) -> (B, T, N, H) with cuDNN flash attention.

    `segments` (B, T): packed segment ids, or None. `implementation="xla"` runs the same call through
    XLA's reference path (any backend; how the CPU tests check the arguments this function builds).
    """
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"cuDNN attention here is self-attention: query length {q.shape[1]} != key length "
                         f"{k.shape[1]}")
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
