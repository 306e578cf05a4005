"""Hugging Face Chameleon `config.json` <-> `lumina_jax.config.ChameleonConfig`.

Reads configs written by transformers 4.43-5.x (`rope_theta` at top level or inside `rope_parameters`) and
by Lumina-mGPT's bundled model (extra fields `mask_image_logits`, `dropout`, `z_loss_weight`). Settings
our decoder does not implement are rejected with a message naming the field, never silently ignored.
"""
from __future__ import annotations

from typing import Any

from lumina_jax.config import ChameleonConfig
from lumina_jax.convert.errors import ConversionError

SUPPORTED_MODEL_TYPES = ("chameleon",)
SUPPORTED_ARCHITECTURES = (
    "ChameleonForConditionalGeneration",  # transformers 4.43+ (facebook/chameleon-*)
    "ChameleonXLLMXForConditionalGeneration",  # Lumina-mGPT checkpoints (Alpha-VLLM/Lumina-mGPT-*)
)
# transformers' ChameleonConfig defaults, used where a config.json omits a field (as transformers does).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "attention_dropout": 0.0, "swin_norm": False, "model_parallel_size": 1, "rope_theta": 10000.0,
}
IMAGE_NAME_PREFIX = "IMGIMG"
DEFAULT_IMAGE_TOKENS = (4, 8196)  # Chameleon's 8192 image codes, used when config.json has no vocabulary_map


def field(hf: dict, key: str):
    """A config.json field, with transformers' default when absent or null."""
    value = hf.get(key)
    return HF_DEFAULTS[key] if value is None and key in HF_DEFAULTS else value


def rope_theta_of(hf: dict, source: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x); plain RoPE only."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(f"{source}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
        theta = params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    else:
        if hf.get("rope_scaling") not in (None, {}):
            raise ConversionError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported (only plain RoPE)")
        theta = field(hf, "rope_theta")
    return float(theta)


def image_token_range(hf: dict, vocab_size: int, source: str) -> tuple[int, int]:
    """[start, end) of the image-token ids: the `IMGIMG*` names of `vocabulary_map`, which must be contiguous."""
    vocab = hf.get("vocabulary_map")
    if not vocab:
        start, end = DEFAULT_IMAGE_TOKENS
        if vocab_size < end:
            raise ConversionError(f"{source}: vocabulary_map is missing and vocab_size={vocab_size} is too small for "
                                  f"the default image ids {start}..{end - 1}")
        return start, end
    ids = sorted(int(v) for k, v in vocab.items() if k.startswith(IMAGE_NAME_PREFIX))
    if not ids:
        raise ConversionError(f"{source}: vocabulary_map has no {IMAGE_NAME_PREFIX}* entries (image token ids)")
    if ids != list(range(ids[0], ids[-1] + 1)):
        raise ConversionError(f"{source}: vocabulary_map image ids are not one contiguous range "
                              f"({len(ids)} ids between {ids[0]} and {ids[-1]})")
    if ids[-1] >= vocab_size:
        raise ConversionError(f"{source}: vocabulary_map image id {ids[-1]} is outside vocab_size={vocab_size}")
    return ids[0], ids[-1] + 1


def chameleon_config_from_hf(
    hf: dict, *, source: str = "config.json", q_norm_rows: int = 1, k_norm_rows: int = 1,
    param_dtype: str = "float32", dtype: str = "bfloat16", scan_layers: bool = True,
    mask_image_logits: bool | None = None,
) -> ChameleonConfig:
    """Maps a Hugging Face / Lumina Chameleon config.json dict to our config.

    `q_norm_rows` / `k_norm_rows` come from the q/k-norm tensors (the config's `model_parallel_size` is not
    reliable: docs/reference.md#qk-norm-row-formats). `mask_image_logits=None` keeps the source model's behaviour: Lumina's flag if
    present, else True (stock transformers Chameleon always masks image logits).
    """
    if not isinstance(hf, dict):
        raise ConversionError(f"{source}: not a JSON object")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{source}: model_type={model_type!r} is not supported (expected 'chameleon')")
    archs = hf.get("architectures") or []
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad or not isinstance(archs, list):
        raise ConversionError(f"{source}: architectures={archs!r} is not supported "
                              f"(expected one of {list(SUPPORTED_ARCHITECTURES)})")
    if field(hf, "hidden_act") != "silu":
        raise ConversionError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported (expected 'silu')")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if field(hf, flag):
            raise ConversionError(f"{source}: {flag}=true is not supported (Chameleon has none)")
    if float(field(hf, "attention_dropout") or 0.0) != 0.0:
        raise ConversionError(f"{source}: attention_dropout={hf['attention_dropout']} is not supported "
                              f"(only residual dropout, Lumina's 'dropout')")
    try:
        vocab_size = int(field(hf, "vocab_size"))
        hidden = int(field(hf, "hidden_size"))
        heads = int(field(hf, "num_attention_heads"))
        kv_heads = int(field(hf, "num_key_value_heads"))
        layers = int(field(hf, "num_hidden_layers"))
        inter = int(field(hf, "intermediate_size"))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: bad size field ({e})") from None
    if hidden % heads:
        raise ConversionError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads
    if hf.get("head_dim") not in (None, head_dim):
        raise ConversionError(f"{source}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads="
                              f"{head_dim} (transformers' Chameleon attention assumes they are equal)")
    if heads % kv_heads:
        raise ConversionError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    start, end = image_token_range(hf, vocab_size, source)
    if mask_image_logits is None:
        mask_image_logits = bool(hf.get("mask_image_logits", True))
    try:
        return ChameleonConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=rope_theta_of(hf, source),
            rms_norm_eps=float(field(hf, "rms_norm_eps")), q_norm_rows=q_norm_rows, k_norm_rows=k_norm_rows,
            swin_norm=bool(field(hf, "swin_norm")),
            max_position_embeddings=int(field(hf, "max_position_embeddings")),
            dropout=float(hf.get("dropout", 0.0) or 0.0), mask_image_logits=mask_image_logits,
            image_token_start=start, image_token_end=end, z_loss_weight=float(hf.get("z_loss_weight", 0.0) or 0.0),
            param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers,
        )
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


# Fields of the HF config that must agree with our config for an export to be loadable.
def _architecture_fields(cfg: ChameleonConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "swin_norm": cfg.swin_norm,
    }


def check_hf_config_matches(hf: dict, cfg: ChameleonConfig, source: str) -> None:
    """Raises if an HF config.json describes a different architecture than `cfg` (one line, every field)."""
    mismatched = [f"{k}={field(hf, k)!r} (checkpoint: {v!r})" for k, v in _architecture_fields(cfg).items()
                  if field(hf, k) != v]
    if abs(rope_theta_of(hf, source) - cfg.rope_theta) > 0:
        mismatched.append(f"rope_theta={rope_theta_of(hf, source)} (checkpoint: {cfg.rope_theta})")
    if mismatched:
        raise ConversionError(f"{source}: does not match the checkpoint's config.json: {'; '.join(mismatched)}")


def image_vocabulary_map(start: int, end: int) -> dict[str, int]:
    """A minimal `vocabulary_map` naming only the image ids (`IMGIMG<code in letters A-J>Z`, code = id - start).

    transformers' Chameleon needs the map to find the image ids it masks; the text names are unknown here.
    """
    digits = "ABCDEFGHIJ"
    return {IMAGE_NAME_PREFIX + "".join(digits[int(c)] for c in str(i - start)) + "Z": i for i in range(start, end)}


def hf_config_from_chameleon(cfg: ChameleonConfig, torch_dtype: str) -> dict[str, Any]:
    """A transformers-5 Chameleon config.json for `cfg` (used when a checkpoint has no stored hf_config.json)."""
    hf = {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        **_architecture_fields(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "model_parallel_size": cfg.q_norm_rows,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "use_cache": True,
        "initializer_range": 0.02,
        "dtype": torch_dtype,
        # Lumina-mGPT fields (ignored by stock transformers).
        "mask_image_logits": cfg.mask_image_logits,
        "dropout": cfg.dropout,
        "z_loss_weight": cfg.z_loss_weight,
        "vocabulary_map": image_vocabulary_map(cfg.image_token_start, cfg.image_token_end),
    }
    return hf
