"""Tensor parallelism: how the model is split across ranks (the ranks themselves run in `worker/tp_worker.py`).

Every rank holds the whole residual stream [T, H] and a slice of each layer's heads or intermediate rows:

- Gated attention: query heads split evenly; KV heads split too, or replicated when the size exceeds the number
  of KV heads (each rank then holds the one KV head its query heads read). o_proj is row-parallel.
- Gated DeltaNet: split by key-head groups. A group is one key head with its Hv/Hk value heads; in the
  checkpoint's interleaved in_proj_qkvz / in_proj_ba layout (docs/model.md §4.1) a rank's groups are one contiguous
  run of rows, while conv1d's channels ([all q | all k | all v]) give three runs. A_log / dt_bias follow the
  value heads; the gated norm (per head dim) is replicated. out_proj is row-parallel.
- MoE: every expert's intermediate rows are split (not expert parallel): all ranks route the same way with the
  replicated router, so no token moves between ranks and the load is even whatever the routing; the shared
  expert is split the same way, and routed + shared partial sums share one all-reduce per layer.
- Embeddings, lm_head, norms, the router, the shared-expert gate and mtp.fc are replicated. lm_head stays whole
  because sampling happens on rank 0 only: followers never compute logits, so a vocab-sharded head would only
  add an all-gather per step to save 0.3 GB per GPU.

The per-rank model is the ordinary `Qwen3NextForCausalLM` built from a config whose head and intermediate
counts are divided by the size (`shard_config`), so the cache pools a rank allocates hold only its heads. The
loader reads each tensor's slice (`TensorShard.read`), and `add_all_reduce_hooks` sums the row-parallel outputs.

FP8 block-128 weights are sliced with their scales, which only works when every slice boundary falls on a
128-row (or column) block edge; `check_fp8_blocks` refuses other sizes before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qnext.worker.config import ModelConfig

FLAG = "tensor_parallel_size (--tensor-parallel-size)"
FP8_BLOCK = 128

# Checkpoint name patterns of the split tensors (anything else is replicated). The group says which split.
_SPLIT_RULES: list[tuple[re.Pattern[str], str, int]] = [(re.compile(p), kind, dim) for p, kind, dim in [
    (r"\.self_attn\.q_proj\.(weight|bias|weight_scale_inv)$", "q_heads", 0),
    (r"\.self_attn\.[kv]_proj\.(weight|bias|weight_scale_inv)$", "kv_heads", 0),
    (r"\.self_attn\.o_proj\.(weight|weight_scale_inv)$", "o_heads", 1),
    (r"\.linear_attn\.in_proj_qkvz\.(weight|weight_scale_inv)$", "qkvz_groups", 0),
    (r"\.linear_attn\.in_proj_ba\.(weight|weight_scale_inv)$", "ba_groups", 0),
    (r"\.linear_attn\.conv1d\.weight$", "conv_channels", 0),
    (r"\.linear_attn\.(A_log|dt_bias)$", "value_heads", 0),
    (r"\.linear_attn\.out_proj\.(weight|weight_scale_inv)$", "out_value_heads", 1),
    (r"\.mlp\.experts\.\d+\.(gate|up)_proj\.(weight|weight_scale_inv)$", "expert_rows", 0),
    (r"\.mlp\.experts\.\d+\.down_proj\.(weight|weight_scale_inv)$", "expert_rows", 1),
    (r"\.mlp\.shared_expert\.(gate|up)_proj\.(weight|weight_scale_inv)$", "shared_rows", 0),
    (r"\.mlp\.shared_expert\.down_proj\.(weight|weight_scale_inv)$", "shared_rows", 1),
    (r"\.mlp\.(gate|up)_proj\.(weight|weight_scale_inv)$", "dense_rows", 0),
    (r"\.mlp\.down_proj\.(weight|weight_scale_inv)$", "dense_rows", 1),
]]
# The bias of a row-parallel linear is added once, after the sum: rank 0 keeps it, the others load zeros.
_ROW_PARALLEL_BIAS = re.compile(r"\.self_attn\.o_proj\.bias$")


def _has_dense_mlp(cfg: ModelConfig) -> bool:
    """Whether any decoder layer (main or MTP) uses the dense MLP of intermediate_size."""
    return (any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
            or (cfg.num_mtp_layers > 0 and cfg.num_experts == 0))


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The config one rank's model is built from: head and intermediate counts divided by `size`.
    ValueError naming --tensor-parallel-size when the model cannot be split that way."""
    if size < 1:
        raise ValueError(f"{FLAG}: must be >= 1, got {size}")
    if size == 1:
        return cfg
    checks = [("num_attention_heads", cfg.num_attention_heads), ("linear_num_key_heads", cfg.linear_num_key_heads),
              ("moe_intermediate_size", cfg.moe_intermediate_size),
              ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)]
    if _has_dense_mlp(cfg):
        checks.append(("intermediate_size", cfg.intermediate_size))
    for name, n in checks:
        if n % size:
            raise ValueError(f"{FLAG}: {size} does not divide the model's {name}={n}; use a size that divides "
                             f"num_attention_heads={cfg.num_attention_heads} and "
                             f"linear_num_key_heads={cfg.linear_num_key_heads}")
    kv = cfg.num_key_value_heads
    if kv % size and size % kv:
        raise ValueError(f"{FLAG}: {size} neither divides nor is a multiple of num_key_value_heads={kv}")
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // size, num_key_value_heads=max(kv // size, 1),
        linear_num_key_heads=cfg.linear_num_key_heads // size,
        linear_num_value_heads=cfg.linear_num_value_heads // size,
        moe_intermediate_size=cfg.moe_intermediate_size // size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // size,
        intermediate_size=cfg.intermediate_size // size if _has_dense_mlp(cfg) else cfg.intermediate_size)


@dataclass(frozen=True)
class TensorShard:
    """Which slice of the full model rank `rank` of `size` holds; `cfg` is the full (checkpoint) config."""

    cfg: ModelConfig
    rank: int
    size: int

    def ranges(self, name: str) -> tuple[int, list[tuple[int, int]]] | None:
        """(dim, [start, stop) runs along dim, concatenated) of checkpoint tensor `name` that this rank reads,
        in weight rows/columns (a `weight_scale_inv` is mapped to blocks by `read`); None = replicated."""
        for pattern, kind, dim in _SPLIT_RULES:
            if pattern.search(name):
                return dim, self._runs(kind)
        return None

    def _runs(self, kind: str) -> list[tuple[int, int]]:
        c, r, n = self.cfg, self.rank, self.size

        def part(total: int, unit: int = 1) -> tuple[int, int]:
            per = total // n
            return r * per * unit, (r + 1) * per * unit

        if kind == "q_heads":
            return [part(c.num_attention_heads, 2 * c.head_dim)]  # per head: [query | gate]
        if kind == "o_heads":
            return [part(c.num_attention_heads, c.head_dim)]
        if kind == "kv_heads":
            if c.num_key_value_heads >= n:
                return [part(c.num_key_value_heads, c.head_dim)]
            kv = r * c.num_key_value_heads // n  # replicated: the KV head this rank's query heads read
            return [(kv * c.head_dim, (kv + 1) * c.head_dim)]
        ratio = c.linear_num_value_heads // c.linear_num_key_heads
        g0, g1 = part(c.linear_num_key_heads)
        if kind == "qkvz_groups":
            group = 2 * c.linear_key_head_dim + 2 * ratio * c.linear_value_head_dim
            return [(g0 * group, g1 * group)]
        if kind == "ba_groups":
            return [(g0 * 2 * ratio, g1 * 2 * ratio)]
        if kind == "conv_channels":  # [q (key_dim) | k (key_dim) | v (value_dim)], each cut by group
            dk, vd = c.linear_key_head_dim, ratio * c.linear_value_head_dim
            kd = c.linear_key_dim
            return [(g0 * dk, g1 * dk), (kd + g0 * dk, kd + g1 * dk), (2 * kd + g0 * vd, 2 * kd + g1 * vd)]
        if kind == "value_heads":
            return [(g0 * ratio, g1 * ratio)]
        if kind == "out_value_heads":
            vd = ratio * c.linear_value_head_dim
            return [(g0 * vd, g1 * vd)]
        if kind == "expert_rows":
            return [part(c.moe_intermediate_size)]
        if kind == "shared_rows":
            return [part(c.shared_expert_intermediate_size)]
        assert kind == "dense_rows", kind
        return [part(c.intermediate_size)]

    def read(self, f: Any, name: str) -> torch.Tensor:
        """This rank's part of tensor `name` from an open safetensors file, reading only that part."""
        split = self.ranges(name)
        if split is None:
            if _ROW_PARALLEL_BIAS.search(name) and self.rank > 0:
                return torch.zeros_like(f.get_tensor(name))
            return f.get_tensor(name)
        dim, runs = split
        sl = f.get_slice(name)
        if name.endswith(".weight_scale_inv"):  # one scale per 128x128 block: whole blocks (check_fp8_blocks)
            runs = [(a // FP8_BLOCK, -(-b // FP8_BLOCK)) for a, b in runs]
        parts = [sl[a:b] if dim == 0 else sl[:, a:b] for a, b in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def check_fp8_blocks(shards: list[TensorShard], fp8_weights: dict[str, tuple[int, ...]]) -> None:
    """Refuse a size whose slices would cut an FP8 128x128 block (docs/model.md §8): its scale would then belong to
    two ranks. fp8_weights: checkpoint name -> full shape of every FP8 weight."""
    seen: set[str] = set()  # one check per tensor kind, not per layer and expert
    for name, shape in fp8_weights.items():
        key = re.sub(r"\.\d+\.", ".N.", name)
        if key in seen:
            continue
        seen.add(key)
        for shard in shards:
            split = shard.ranges(name)
            if split is None:
                continue
            dim, runs = split
            for a, b in runs:
                if a % FP8_BLOCK or (b % FP8_BLOCK and b != shape[dim]):
                    raise ValueError(
                        f"{FLAG}: {shard.size} would cut the FP8 128x128 blocks of {name} (rank {shard.rank} "
                        f"gets {'rows' if dim == 0 else 'columns'} [{a}, {b}) of {shape[dim]}); FP8 checkpoints "
                        f"need every slice on a multiple of 128 - use a smaller size")


def add_all_reduce_hooks(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the partial outputs of the row-parallel modules over the ranks: attention o_proj, DeltaNet out_proj,
    and each decoder layer's whole MLP / MoE block (routed + shared expert in one all-reduce)."""
    def all_reduce(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    for name, module in model.named_modules():
        if re.search(r"(\.self_attn\.o_proj|\.linear_attn\.out_proj|\.layers\.\d+\.mlp)$", name):
            module.register_forward_hook(all_reduce)
