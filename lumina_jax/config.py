"""Model configuration of the Chameleon decoder: a frozen dataclass with presets.

Fields are plain Python values so a config round-trips through JSON (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from lumina_jax.validation import check_float, check_int

# Values of ChameleonConfig.attention_impl (implemented in lumina_jax.models.attention_ops).
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash", "cudnn")

WEIGHT_QUANT_MODES = ("none", "int8")
KV_CACHE_QUANT_MODES = ("none", "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class ChameleonConfig:
    # --- architecture -----------------------------------------------------------------------------------
    vocab_size: int = 65536  # rows of embed_tokens and columns of lm_head
    hidden_size: int = 4096  # model width D
    intermediate_size: int = 11008  # SwiGLU hidden width F
    num_layers: int = 32  # decoder blocks
    num_heads: int = 32  # query heads H
    num_kv_heads: int = 32  # key/value heads (GQA when < num_heads)
    head_dim: int = 128  # per-head width; hidden_size == num_heads * head_dim for published models
    rope_theta: float = 10000.0  # RoPE base (rotate-half, Hugging Face layout)
    rms_norm_eps: float = 1e-5  # epsilon of the RMSNorms
    qk_norm_eps: float = 1e-5  # epsilon of the per-head q/k LayerNorm (hard-coded 1e-5 in the reference)
    q_norm_rows: int = 1  # rows stored for q_norm (1 = Lumina 7B, 4 = Lumina 34B, num_heads = HF); row i serves heads i*H/r..
    k_norm_rows: int = 1  # rows stored for k_norm (same rule over num_kv_heads)
    swin_norm: bool = False  # True: norms on sublayer outputs (34B); False: pre-norm (7B)
    max_position_embeddings: int = 4096  # informational; RoPE has no table limit
    # --- Lumina additions -------------------------------------------------------------------------------
    dropout: float = 0.0  # residual dropout on attention and MLP outputs (training only)
    mask_image_logits: bool = False  # set image-token logits to float32 min (must be False for generation)
    image_token_start: int = 4  # first image-token id (inclusive); must equal the tokenizer's (Lumina.load checks)
    image_token_end: int = 8196  # last image-token id (exclusive); the model's image mask and the aot tool use it
    z_loss_weight: float = 0.0  # weight of the (logsumexp)^2 auxiliary loss
    # --- numerics and memory ----------------------------------------------------------------------------
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    logits_dtype: str = "float32"  # dtype of returned logits
    scan_layers: bool = True  # stack layers with nn.scan (parameters carry a leading "layers" axis)
    remat_policy: str = "none"  # named rematerialisation policy for each block (see models.chameleon.REMAT_POLICIES)
    attention_impl: str = "auto"  # auto (by backend: TPU splash, GPU cudnn, CPU blockwise), dense, blockwise, splash, cudnn
    attention_block: int = 512  # query/key block (tokens) of the blockwise and splash implementations
    # --- inference-only quantisation (docs/quantization.md) ----------------------------------------------
    weight_quant: str = "none"  # "int8": every projection and lm_head stored int8 with per-output-channel scales
    kv_cache_quant: str = "none"  # "int8" / "fp8" (e4m3): the KV cache stored quantised with per-slot, per-head scales

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "q_norm_rows", "k_norm_rows", "max_position_embeddings",
                     "attention_block"):
            check_int(f"ChameleonConfig.{name}", getattr(self, name), 1, 2**31 - 1)
        for name in ("image_token_start", "image_token_end"):
            check_int(f"ChameleonConfig.{name}", getattr(self, name), 0, 2**31 - 1)
        for name in ("rope_theta", "rms_norm_eps", "qk_norm_eps"):
            check_float(f"ChameleonConfig.{name}", getattr(self, name), 0.0, lo_open=True)
        check_float("ChameleonConfig.z_loss_weight", self.z_loss_weight, 0.0)
        check_float("ChameleonConfig.dropout", self.dropout)
        for name in ("swin_norm", "mask_image_logits", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ChameleonConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.head_dim % 2:
            raise ValueError(f"ChameleonConfig.head_dim={self.head_dim} must be even (rotate-half RoPE)")
        for name in ("param_dtype", "dtype", "logits_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"ChameleonConfig.{name}={getattr(self, name)!r} is not a dtype name") from None
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ChameleonConfig.dropout={self.dropout} must be in [0, 1)")
        if not 0 <= self.image_token_start <= self.image_token_end:
            raise ValueError(
                f"ChameleonConfig image_token_start={self.image_token_start}, image_token_end={self.image_token_end} "
                "must satisfy 0 <= start <= end"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ChameleonConfig.attention_impl={self.attention_impl!r} is unknown; known: {ATTENTION_IMPLS}")
        for name, known in (("weight_quant", WEIGHT_QUANT_MODES), ("kv_cache_quant", KV_CACHE_QUANT_MODES)):
            if getattr(self, name) not in known:
                raise ValueError(f"ChameleonConfig.{name}={getattr(self, name)!r} is unknown; known: {list(known)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_heads % self.q_norm_rows:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of q_norm_rows={self.q_norm_rows}")
        if self.num_kv_heads % self.k_norm_rows:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} is not a multiple of k_norm_rows={self.k_norm_rows}")

    def replace(self, **kw) -> "ChameleonConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChameleonConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ChameleonConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, ChameleonConfig] = {
    # Published Lumina-mGPT 7B (MHA, pre-norm, q/k-norm with one shared row).
    "7b": ChameleonConfig(),
    # Published Lumina-mGPT 34B (GQA 64/8, swin-norm, q/k-norm with 4 rows).
    "34b": ChameleonConfig(
        hidden_size=8192, intermediate_size=22016, num_layers=48, num_heads=64, num_kv_heads=8,
        swin_norm=True, q_norm_rows=4, k_norm_rows=4,
    ),
    # Tiny shapes for tests (fp32 everywhere).
    "tiny": ChameleonConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=16, image_token_start=4, image_token_end=260, param_dtype="float32", dtype="float32",
    ),
    "tiny-gqa-swin": ChameleonConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, swin_norm=True, q_norm_rows=2, k_norm_rows=2, image_token_start=4, image_token_end=260,
        param_dtype="float32", dtype="float32",
    ),
}


def model_preset(name: str, **overrides) -> ChameleonConfig:
    """The ChameleonConfig preset `name` (7b, 34b, tiny, ...) with `overrides` applied; configs/*.py build on these."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
