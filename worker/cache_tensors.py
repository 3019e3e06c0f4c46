"""Device memory of the hybrid cache (docs/architecture.md §5).

- Full-attention layers (and the MTP head's attention layer): a paged KV pool per layer,
  k/v [num_blocks, block_size, Hkv, D]; a sequence owns blocks listed in its block table. An FP8 pool
  (float8_e4m3fn, `--kv-cache-dtype fp8`) has a float32 scale per row beside it, k/v_scale
  [num_blocks, block_size, Hkv], set when the row is written (kernels/attention/reference.py).
- Gated DeltaNet layers: a pool of state slots, conv [n_gdn, num_slots, K-1, conv_dim] (time-major) and recurrent
  [n_gdn, num_slots, Hv, dk, dv]; a running sequence owns one slot across all DeltaNet layers.
- With MTP speculation (up to k_max draft tokens), each slot also has k_max intermediate states
  [n_gdn, num_slots, k_max, ...]: a verify step records the state after each of its first k positions there,
  so the slot can be rolled back to the last accepted token. This multiplies the state memory by 1 + k_max.
- Prefix caching: a pool of state checkpoints [n_gdn, num_checkpoints, ...] (conv and recurrent state after a
  given token of a cached prefix) and the target's final hidden state at that token [num_checkpoints, H].

With CUDA graphs (worker/graph_runner.py) one state slot more than `num_slots` exists: the padding slot, never
handed out. The padded rows of a graph's batch run as sequences of their own and compute into it, so they touch
no real state.

Which block or slot belongs to whom is decided by the (torch-free) allocator in `worker/cache.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qnext.kernels.fp8.reference import FP8_DTYPE
from qnext.worker.config import ModelConfig

KV_SCALE_DTYPE = torch.float32  # the per-row scales of an FP8 KV pool


@dataclass(frozen=True)
class CacheShape:
    num_blocks: int
    block_size: int
    num_slots: int
    kv_dtype: torch.dtype  # KV storage: the activation dtype, or float8_e4m3fn (with per-row scales)
    state_dtype: torch.dtype  # recurrent state; fp32 by default (bf16 halves it)
    conv_dtype: torch.dtype
    hidden_dtype: torch.dtype  # prefix-cache checkpoints' hidden states: the activation dtype
    max_spec_tokens: int = 0  # k_max: intermediate states kept per slot for speculative verify
    num_checkpoints: int = 0  # prefix-cache state checkpoints (0 = prefix caching off)
    padding_slot: bool = False  # one more state slot, for CUDA-graph padding rows


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype) -> int:
    """Bytes of one KV block summed over every full-attention layer (incl. MTP layers), FP8 scales included."""
    layers = len(cfg.full_attention_layers) + cfg.num_mtp_layers
    per_row = cfg.head_dim * kv_dtype.itemsize + (KV_SCALE_DTYPE.itemsize if kv_dtype == FP8_DTYPE else 0)
    return layers * 2 * block_size * cfg.num_key_value_heads * per_row


def checkpoint_bytes(cfg: ModelConfig, state_dtype: torch.dtype, conv_dtype: torch.dtype,
                     hidden_dtype: torch.dtype) -> int:
    """Bytes of one prefix-cache checkpoint: a slot's state (no speculative copies) and one hidden vector.
    Its tail KV block comes out of the KV pool."""
    return state_bytes_per_slot(cfg, state_dtype, conv_dtype) + cfg.hidden_size * hidden_dtype.itemsize


def state_bytes_per_slot(cfg: ModelConfig, state_dtype: torch.dtype, conv_dtype: torch.dtype,
                         max_spec_tokens: int = 0) -> int:
    """Bytes of one sequence's conv + recurrent state summed over every DeltaNet layer, with the
    intermediate states speculative verify keeps."""
    n = len(cfg.linear_attention_layers)
    conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * conv_dtype.itemsize
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_dtype.itemsize
    return n * (conv + ssm) * (1 + max_spec_tokens)


class CacheTensors:
    def __init__(self, cfg: ModelConfig, shape: CacheShape, device: torch.device | str) -> None:
        self.shape = shape
        n_kv = len(cfg.full_attention_layers) + cfg.num_mtp_layers
        kv = (shape.num_blocks, shape.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(kv, dtype=shape.kv_dtype, device=device) for _ in range(n_kv)]
        self.v_cache = [torch.zeros(kv, dtype=shape.kv_dtype, device=device) for _ in range(n_kv)]
        # FP8 pools: one scale per (block, position, KV head); None for pools in the activation dtype
        self.k_scale = self.v_scale = None
        if shape.kv_dtype == FP8_DTYPE:
            self.k_scale = [torch.zeros(kv[:3], dtype=KV_SCALE_DTYPE, device=device) for _ in range(n_kv)]
            self.v_scale = [torch.zeros(kv[:3], dtype=KV_SCALE_DTYPE, device=device) for _ in range(n_kv)]
        n_gdn = len(cfg.linear_attention_layers)
        self.padding_slot = shape.num_slots if shape.padding_slot else None
        slots = shape.num_slots + shape.padding_slot
        self.conv_state = torch.zeros(n_gdn, slots, cfg.linear_conv_kernel_dim - 1, cfg.conv_dim,
                                      dtype=shape.conv_dtype, device=device)
        self.ssm_state = torch.zeros(n_gdn, slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                     cfg.linear_value_head_dim, dtype=shape.state_dtype, device=device)
        k = shape.max_spec_tokens
        self.spec_conv = torch.zeros(n_gdn, slots, k, *self.conv_state.shape[2:],
                                     dtype=shape.conv_dtype, device=device) if k else None
        self.spec_ssm = torch.zeros(n_gdn, slots, k, *self.ssm_state.shape[2:],
                                    dtype=shape.state_dtype, device=device) if k else None
        c = shape.num_checkpoints
        self.ckpt_conv = torch.zeros(n_gdn, c, *self.conv_state.shape[2:], dtype=shape.conv_dtype, device=device)
        self.ckpt_ssm = torch.zeros(n_gdn, c, *self.ssm_state.shape[2:], dtype=shape.state_dtype, device=device)
        self.ckpt_hidden = torch.zeros(c, cfg.hidden_size, dtype=shape.hidden_dtype, device=device)

    def kv_pool(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Attention layer i's (k, v, k_scale, v_scale); the scales are None unless the pools are FP8."""
        if self.k_scale is None:
            return self.k_cache[i], self.v_cache[i], None, None
        return self.k_cache[i], self.v_cache[i], self.k_scale[i], self.v_scale[i]

    def rollback(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Set each slot's DeltaNet state to the one recorded after verify position `positions[i]`
        (the last accepted token), for every DeltaNet layer. slots, positions: [n] int64."""
        assert self.spec_conv is not None and self.spec_ssm is not None
        self.conv_state[:, slots] = self.spec_conv[:, slots, positions]
        self.ssm_state[:, slots] = self.spec_ssm[:, slots, positions]

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """DeltaNet state slot src[i] -> dst[i], every layer (parallel samples forked from one prompt)."""
        s, d = self._index(src), self._index(dst)
        self.conv_state[:, d] = self.conv_state[:, s]
        self.ssm_state[:, d] = self.ssm_state[:, s]

    # ---- prefix cache: checkpoints and block copies (worker/prefix_cache.py) ----------------------------------

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """KV block src[i] -> dst[i] in every attention pool (MTP's included), with an FP8 pool's scales. All
        reads happen before any write, so a destination may be another pair's source."""
        s, d = self._index(src), self._index(dst)
        for pool in (*self.k_cache, *self.v_cache, *(self.k_scale or ()), *(self.v_scale or ())):
            pool[d] = pool[s]

    def save_checkpoints(self, slots: list[int], ckpt_ids: list[int], hidden: torch.Tensor) -> None:
        """The DeltaNet state of slots[i] (every layer) and hidden[i] ([n, H], the target's final hidden state
        of the checkpoint's last token) into checkpoint ckpt_ids[i]."""
        s, c = self._index(slots), self._index(ckpt_ids)
        self.ckpt_conv[:, c] = self.conv_state[:, s]
        self.ckpt_ssm[:, c] = self.ssm_state[:, s]
        self.ckpt_hidden[c] = hidden.to(self.ckpt_hidden.dtype)

    def restore_checkpoints(self, ckpt_ids: list[int], slots: list[int]) -> None:
        """Checkpoint ckpt_ids[i]'s DeltaNet state into slots[i] (the request's own slot: copy on write)."""
        c, s = self._index(ckpt_ids), self._index(slots)
        self.conv_state[:, s] = self.ckpt_conv[:, c]
        self.ssm_state[:, s] = self.ckpt_ssm[:, c]

    def _index(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64, device=self.conv_state.device)
