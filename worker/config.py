"""The checkpoint's `config.json` (model_type `qwen3_next`) as frozen dataclasses.

Both spellings of the RoPE fields are accepted: the hub's files carry `rope_theta`,
`partial_rotary_factor` and `rope_scaling` at top level, transformers 5's `save_pretrained`
writes a `rope_parameters` dict instead. Every check names the field it rejects.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"config.json: {field_name}: {message}")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    partial_rotary_factor: float
    # YaRN (rope_type "yarn"); None for plain RoPE.
    yarn_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantConfig:
    """Fine-grained FP8: e4m3 weights with one fp32 `weight_scale_inv` per 128x128 block."""

    method: str  # "fp8"
    fmt: str  # "e4m3"
    activation_scheme: str  # "dynamic": activations quantised per token per 128-wide group at run time
    block_size: tuple[int, int]
    modules_to_not_convert: tuple[str, ...]

    def is_quantized(self, module_name: str) -> bool:
        """Whether the linear `module_name` (e.g. `model.layers.3.self_attn.q_proj`) is stored as FP8."""
        for pattern in self.modules_to_not_convert:
            if module_name == pattern or module_name.startswith(pattern + "."):
                return False
        return True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # gated attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    rope: RopeConfig
    # gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MLP / MoE
    intermediate_size: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    # MTP: number of `mtp.layers.*` (0 = no MTP head)
    num_mtp_layers: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    quant: QuantConfig | None
    # Everything else in config.json, kept so nothing the checkpoint says is lost.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_supported_len(self) -> int:
        """The longest sequence the config supports: with YaRN, factor x original_max_position_embeddings (as
        vLLM derives it: the model card's factor 4 over 262,144 gives 1,048,576), else max_position_embeddings."""
        if self.rope.yarn_factor is not None and self.rope.original_max_position_embeddings is not None:
            return int(self.rope.yarn_factor * self.rope.original_max_position_embeddings)
        return self.max_position_embeddings

    def __post_init__(self) -> None:
        _require(self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")
        _require(self.hidden_size > 0, "hidden_size", f"must be > 0, got {self.hidden_size}")
        _require(len(self.layer_types) == self.num_hidden_layers, "layer_types",
                 f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            _require(t in (LINEAR_ATTENTION, FULL_ATTENTION), f"layer_types[{i}]",
                     f"must be '{LINEAR_ATTENTION}' or '{FULL_ATTENTION}', got {t!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        _require(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
                 f"{self.linear_num_value_heads} is not a multiple of linear_num_key_heads {self.linear_num_key_heads}")
        rotary_dim = self.rotary_dim
        _require(0 < rotary_dim <= self.head_dim and rotary_dim % 2 == 0, "partial_rotary_factor",
                 f"gives rotary dim {rotary_dim} for head_dim {self.head_dim}; it must be even and in (0, head_dim]")
        _require(0 < self.num_experts_per_tok <= max(self.num_experts, 1), "num_experts_per_tok",
                 f"{self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        _require(self.decoder_sparse_step >= 1, "decoder_sparse_step", f"must be >= 1, got {self.decoder_sparse_step}")
        for i in self.mlp_only_layers:
            _require(0 <= i < self.num_hidden_layers, "mlp_only_layers", f"layer {i} out of range")
        _require(self.linear_conv_kernel_dim >= 2, "linear_conv_kernel_dim",
                 f"must be >= 2, got {self.linear_conv_kernel_dim}")

    # Derived sizes, as named in docs/model.md §1.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


def _rope_from_json(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        src = dict(params)
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        src = {"rope_theta": raw.get("rope_theta", 10000.0),
               "partial_rotary_factor": raw.get("partial_rotary_factor", 1.0)}
        scaling = raw.get("rope_scaling")
    partial = float(src.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    theta = float(src["rope_theta"])
    _require(theta > 0, "rope_theta", f"must be > 0, got {theta}")
    _require(0 < partial <= 1, "partial_rotary_factor", f"must be in (0, 1], got {partial}")
    if not scaling:
        return RopeConfig(theta=theta, partial_rotary_factor=partial)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    _require(rope_type == "yarn", "rope_scaling.rope_type",
             f"only 'yarn' is supported for Qwen3-Next, got {rope_type!r}")
    factor = scaling.get("factor")
    orig = scaling.get("original_max_position_embeddings")
    _require(orig is not None, "rope_scaling.original_max_position_embeddings", "is required for YaRN")
    if factor is None:
        factor = raw["max_position_embeddings"] / orig
    _require(factor >= 1, "rope_scaling.factor", f"must be >= 1, got {factor}")
    return RopeConfig(
        theta=theta, partial_rotary_factor=partial, yarn_factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(scaling.get("beta_fast") or 32.0), beta_slow=float(scaling.get("beta_slow") or 1.0),
        mscale=scaling.get("mscale"), mscale_all_dim=scaling.get("mscale_all_dim"),
        attention_factor=scaling.get("attention_factor"), truncate=bool(scaling.get("truncate", True)),
    )


def _quant_from_json(raw: dict[str, Any]) -> QuantConfig | None:
    q = raw.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    _require(method == "fp8", "quantization_config.quant_method", f"only 'fp8' is supported, got {method!r}")
    fmt = q.get("fmt", "e4m3")
    _require(fmt == "e4m3", "quantization_config.fmt", f"only 'e4m3' is supported, got {fmt!r}")
    scheme = q.get("activation_scheme", "dynamic")
    _require(scheme == "dynamic", "quantization_config.activation_scheme",
             f"only 'dynamic' is supported, got {scheme!r}")
    block = q.get("weight_block_size")
    _require(block is not None and list(block) == [128, 128], "quantization_config.weight_block_size",
             f"only [128, 128] is supported, got {block!r}")
    return QuantConfig(method=method, fmt=fmt, activation_scheme=scheme, block_size=(128, 128),
                       modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()))


_KNOWN_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "full_attention_interval", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "num_attention_heads", "num_key_value_heads", "head_dim",
    "attention_bias", "rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
    "num_nextn_predict_layers", "mtp_num_hidden_layers", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
    "quantization_config", "model_type",
}


def config_from_dict(raw: dict[str, Any], has_mtp_tensors: bool = False) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json.

    `has_mtp_tensors`: whether the checkpoint holds `mtp.*` tensors; the hub's config.json has no MTP field,
    so an absent count means 1 MTP layer when the tensors exist (vLLM does the same) and 0 otherwise.
    """
    _require(raw.get("model_type") == "qwen3_next", "model_type",
             f"expected 'qwen3_next', got {raw.get('model_type')!r}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    _require(not missing, missing[0] if missing else "", "is required")
    n_layers = int(raw["num_hidden_layers"])
    layer_types = raw.get("layer_types")
    if layer_types is None:
        interval = int(raw.get("full_attention_interval", 4))
        _require(interval >= 1, "full_attention_interval", f"must be >= 1, got {interval}")
        layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)]
    mtp = raw.get("num_nextn_predict_layers", raw.get("mtp_num_hidden_layers"))
    num_mtp = int(mtp) if mtp is not None else (1 if has_mtp_tensors else 0)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        layer_types=tuple(layer_types),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 262144)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        attention_bias=bool(raw.get("attention_bias", False)),
        rope=_rope_from_json(raw),
        linear_num_key_heads=int(raw.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(raw.get("linear_num_value_heads", 32)),
        linear_key_head_dim=int(raw.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(raw.get("linear_value_head_dim", 128)),
        linear_conv_kernel_dim=int(raw.get("linear_conv_kernel_dim", 4)),
        intermediate_size=int(raw.get("intermediate_size", 5120)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 512)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 512)),
        num_experts=int(raw.get("num_experts", 512)),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 10)),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in (raw.get("mlp_only_layers") or ())),
        num_mtp_layers=num_mtp,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        quant=_quant_from_json(raw),
        extra={k: v for k, v in raw.items() if k not in _KNOWN_FIELDS},
    )


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json's fields with `overrides`' top-level keys replacing them. A `rope_scaling` override also
    replaces the scaling inside a transformers-5 `rope_parameters` dict (which would otherwise win over it);
    null there means plain RoPE."""
    merged = {**raw, **overrides}
    params = raw.get("rope_parameters")
    if "rope_scaling" in overrides and isinstance(params, dict):
        base = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
        merged["rope_parameters"] = {**base, **(overrides["rope_scaling"] or {"rope_type": "default"})}
    return merged


def config_overlay(model_dir: str | Path, overrides: dict[str, Any]) -> Path:
    """A temporary directory that is `model_dir` (each entry a symlink to the original) except for a config.json
    with `overrides` applied: every reader of the checkpoint, in any process (the loader, tensor-parallel ranks,
    the tokenizer files), sees the overridden config, and the checkpoint itself is never written (the container
    mounts it read-only). Removed when this process exits."""
    src = Path(model_dir).resolve()
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    merged = apply_overrides(json.loads(path.read_text()), overrides)
    config_from_dict(merged)  # a bad override fails here, naming the field
    overlay = Path(tempfile.mkdtemp(prefix="qnext-config-"))
    atexit.register(shutil.rmtree, overlay, ignore_errors=True)
    for entry in src.iterdir():
        if entry.name != "config.json":
            (overlay / entry.name).symlink_to(entry)
    (overlay / "config.json").write_text(json.dumps(merged, indent=2))
    return overlay


def load_config(model_dir: str | Path, has_mtp_tensors: bool = False) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    with open(path) as f:
        return config_from_dict(json.load(f), has_mtp_tensors=has_mtp_tensors)


def yarn_inv_freq_and_scale(rope: RopeConfig, rotary_dim: int) -> tuple[list[float], float]:
    """Inverse frequencies and the cos/sin scale for RoPE (YaRN when configured), as plain floats.

    YaRN (arXiv 2309.00071): dimensions that rotate fast (many turns within the original context) keep their
    frequency (extrapolation), slow ones are divided by `factor` (interpolation), with a linear ramp between;
    cos/sin are scaled by 0.1*ln(factor)+1 to keep attention entropy.
    """
    base = rope.theta
    half = rotary_dim // 2
    extrap = [1.0 / base ** (2 * i / rotary_dim) for i in range(half)]
    if rope.yarn_factor is None:
        return extrap, 1.0
    factor = rope.yarn_factor
    orig = rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attn_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attn_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attn_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    inv = []
    for i in range(half):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # weight of the extrapolated (unchanged) frequency
        inv.append(extrap[i] / factor * (1 - keep) + extrap[i] * keep)
    return inv, attn_factor
