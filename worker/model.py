"""Qwen3-Next forward over a packed varlen batch (docs/model.md §2-§7).

Shapes: T tokens in the step (all sequences packed), H hidden, Hq/Hkv attention heads of size D,
Hk/Hv DeltaNet key/value heads of sizes dk/dv, E experts.

One call handles prefill chunks and decode tokens together: `ForwardBatch` says where each sequence starts,
its positions, its KV slots / block table (full-attention layers) and its state slot (DeltaNet layers).
Parameter names mirror the checkpoint's, so the loader maps names 1:1 except the stacked experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from qnext.kernels.cpu import attention as attention_cpu
from qnext.kernels.cpu import deltanet as deltanet_cpu
from qnext.kernels.attention import paged_attention_varlen, write_kv
from qnext.kernels.conv1d import causal_conv1d_varlen
from qnext.kernels.gated_delta_rule import gated_delta_rule_varlen
from qnext.kernels.moe import fused_moe, route_logits
from qnext.kernels.norms import add_rms_norm_zero_centred, gated_rms_norm, rms_norm_zero_centred
from qnext.kernels.step_metadata import StepMetadata, VarlenLayout
from qnext.worker.cache_tensors import CacheTensors
from qnext.worker.config import FULL_ATTENTION, ModelConfig, yarn_inv_freq_and_scale


@dataclass
class ForwardBatch:
    """Varlen metadata for one forward, built once per step by the engine."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64 position of each token in its sequence
    query_lens: list[int]  # new tokens per sequence (sum = T)
    context_lens: list[int]  # tokens in the KV cache after this step (computed before + new)
    slot_mapping: torch.Tensor  # [T] int64 flat KV slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    state_slots: torch.Tensor  # [B] int64 DeltaNet state slot of each sequence
    # Speculative verify: per sequence, whether its chunk is [last token, drafts...] whose DeltaNet states
    # after each position must be kept for rollback (None = no verify chunks).
    is_verify: list[bool] | None = None
    # On a CPU, chunks of up to this many tokens (and every verify chunk) take the C token steps, longer ones the
    # torch paths. 1 for the target model: prompts stay on torch however they are chunked. The MTP's catch-up
    # passes (worker/spec_decode.py) pass more: their few rows per sequence only feed drafts, which the target
    # verifies, and the torch attention path cost them ~0.7 ms a pass at one sequence.
    token_step_max_len: int = 1
    # The Triton kernels' varlen tables for this step, built on first use and shared by every layer. Not an init
    # field: each process (tensor-parallel rank) builds its own; a CUDA graph's static batch swaps in its own.
    kernel_meta: StepMetadata = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kernel_meta = StepMetadata(VarlenLayout.of(self.query_lens, self.context_lens, self.is_verify),
                                        self.input_ids.device)

    def forget_derived(self) -> None:
        """Drop every value cached from the host lists and tables (the cached properties below): a static batch
        refilled in place for the next step (worker/graph_runner.py) must not read the last step's."""
        for name, attr in type(self).__dict__.items():
            if isinstance(attr, cached_property):
                self.__dict__.pop(name, None)

    @cached_property  # read by every DeltaNet layer: computed once per step
    def has_initial_state(self) -> list[bool]:
        """A sequence whose earlier tokens were computed continues from its saved conv/recurrent state."""
        return [c > q for q, c in zip(self.query_lens, self.context_lens)]

    @cached_property  # read by the C token steps of every layer on a CPU: built once per step
    def token_step_split(self) -> tuple[list[tuple[int, int, int]], list[int], torch.Tensor | None]:
        """The sequences the C token steps (kernels/cpu) advance token by token, decodes and verify chunks, as
        (index, first row, tokens); the indices of the prefill chunks (the torch paths'); those chunks' rows (None
        without any)."""
        verify = self.is_verify or [False] * len(self.query_lens)
        steps, prefill, rows, start = [], [], [], 0
        for i, (n, v) in enumerate(zip(self.query_lens, verify)):
            if n <= self.token_step_max_len or v:
                steps.append((i, start, n))
            else:
                prefill.append(i)
                rows.extend(range(start, start + n))
            start += n
        return steps, prefill, torch.tensor(rows, dtype=torch.int64) if rows else None

    @cached_property
    def token_step_seqs(self) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """For the DeltaNet layers' C token steps: their sequence table ([n, deltanet_cpu.SEQ_FIELDS] int64), the
        prefill chunks' indices and rows (token_step_split)."""
        steps, prefill, rows = self.token_step_split
        verify, slots, init = self.is_verify, self.state_slots.tolist(), self.has_initial_state
        table = [(start, n, slots[i], int(not init[i]), int(bool(verify and verify[i]))) for i, start, n in steps]
        seqs = torch.tensor(table, dtype=torch.int64).reshape(-1, deltanet_cpu.SEQ_FIELDS)
        return seqs, prefill, rows

    @cached_property
    def attention_step_seqs(self) -> torch.Tensor:
        """For the attention layers' C token steps: their sequence table ([n, attention_cpu.SEQ_FIELDS] int64)."""
        table = [(start, n, self.context_lens[i], i) for i, start, n in self.token_step_split[0]]
        return torch.tensor(table, dtype=torch.int64).reshape(-1, attention_cpu.SEQ_FIELDS)

    @property
    def last_token_indices(self) -> torch.Tensor:
        """[B] row of each sequence's last token in the packed batch."""
        ends = torch.tensor(self.query_lens, device=self.input_ids.device).cumsum(0)
        return ends - 1


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + w); w starts at zero."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_zero_centred(x, self.weight, self.eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), the sum rounded to x's dtype first (one pass on a CPU or GPU)."""
    return add_rms_norm_zero_centred(x, residual, norm.weight, norm.eps)


class RotaryEmbedding(nn.Module):
    """Partial NeoX RoPE on the first `rotary_dim` dims of each head, YaRN when configured."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.scale = yarn_inv_freq_and_scale(cfg.rope, cfg.rotary_dim)
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)
        self.rotary_dim = cfg.rotary_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, R]: rotate dims [0, R) in NeoX halves, pass the rest through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    rot = rot * cos[:, None] + rotated * sin[:, None]
    return torch.cat([rot, rest], dim=-1)


def fp32_copies(module: nn.Module, params: tuple[torch.Tensor, ...], make) -> tuple[torch.Tensor, ...]:
    """make(*params), the fp32 forms of a module's parameters the C token steps read, cached on the module and
    made again only when a parameter changes (a reload)."""
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = module.__dict__.get("_fp32_copies")
    if cached is None or cached[0] != key:
        module.__dict__["_fp32_copies"] = cached = (key, make(*params))
    return cached[1]


def project(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of `module.PROJECTIONS` (dotted names of bias-free-or-not linears that all read x), in order:
    one GEMM when the loader fused them (`module.fused_projections`, set by worker/cpu_linear.py on a CPU),
    else one call each."""
    fused = module.__dict__.get("fused_projections")
    if fused is not None:
        return fused(x)
    return [module.get_submodule(name)(x) for name in module.PROJECTIONS]


class GatedAttention(nn.Module):
    """Full attention with a per-head sigmoid output gate (docs/model.md §5)."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: ModelConfig, cache_index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        # q_proj rows per head: [query (D) | gate (D)]
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.cache_index = cache_index  # which KV pool of CacheTensors this layer owns

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qg, k, v = project(self, x)
        pools = cache.kv_pool(self.cache_index)
        if attention_cpu.runs(x, pools[0], pools[2]):
            o = self._cpu_token_steps(qg, k, v, batch, pools, cos, sin)
        else:
            o = self._attend(qg, k, v, batch.slot_mapping, batch.block_tables, batch.query_lens, batch.context_lens,
                             batch.kernel_meta, pools, cos, sin)
        return self.o_proj(o)

    def _attend(self, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                kernel_meta: StepMetadata | None, pools: tuple, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The projections -> the gated attention rows [T, Hq * D] o_proj reads: norms, RoPE, the paged attention
        (which writes the keys and values) and the gate as separate kernels (Triton on CUDA, torch references
        elsewhere)."""
        T = qg.shape[0]
        q, gate = qg.reshape(T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [T, Hq, D] each
        q = apply_rope(self.q_norm(q), cos, sin)
        k, v = self._keys_values(k, v, cos, sin)
        k_cache, v_cache, k_scale, v_scale = pools
        o = paged_attention_varlen(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, query_lens, context_lens,
            self.head_dim ** -0.5, kernel_meta, k_scale=k_scale, v_scale=v_scale)
        o = o * torch.sigmoid(gate)
        return o.reshape(T, -1)

    def _cpu_token_steps(self, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                         pools: tuple, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """_attend's rows with the decode and verify rows from the C token steps (kernels/cpu/attention.py) and
        only the prefill chunks through _attend (on their own rows: each sequence's result is its own)."""
        seqs = batch.attention_step_seqs
        _, prefill, rows = batch.token_step_split  # not token_step_seqs: the DeltaNet table, none in the MTP layer
        if not seqs.shape[0]:
            return self._attend(qg, k, v, batch.slot_mapping, batch.block_tables, batch.query_lens,
                                batch.context_lens, None, pools, cos, sin)
        out = torch.empty(qg.shape[0], self.num_heads * self.head_dim, dtype=qg.dtype)
        k_cache, v_cache, _, _ = pools
        attention_cpu.token_steps(
            qg, k, v, seqs, (self.num_heads, self.num_kv_heads, self.head_dim), cos.contiguous(),
            sin.contiguous(), *self._norm_factors(), self.q_norm.eps, self.head_dim ** -0.5, k_cache, v_cache,
            batch.slot_mapping, batch.block_tables, out)
        if rows is not None:
            out[rows] = self._attend(qg[rows], k[rows], v[rows], batch.slot_mapping[rows], batch.block_tables[prefill],
                                     [batch.query_lens[j] for j in prefill], [batch.context_lens[j] for j in prefill],
                                     None, pools, cos[rows], sin[rows])
        return out

    def _norm_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + q_norm.weight, 1 + k_norm.weight) in fp32 for the C token steps, made again only when a weight
        changes (a reload)."""
        return fp32_copies(self, (self.q_norm.weight, self.k_norm.weight),
                           lambda q, k: ((1.0 + q.float()).contiguous(), (1.0 + k.float()).contiguous()))

    def _keys_values(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections' k, v [T, Hkv * D] as the cache holds them: k normed and rotated, [T, Hkv, D] each."""
        T = k.shape[0]
        k = apply_rope(self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim)), cos, sin)
        return k, v.reshape(T, self.num_kv_heads, self.head_dim)

    def write_kv(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        """Only the keys and values `forward` writes for x's rows (same projections, so the same values); no
        attention. For rows whose output nobody reads but whose K/V later rows attend to."""
        _, k, v = project(self, x)
        k, v = self._keys_values(k, v, cos, sin)
        k_cache, v_cache, k_scale, v_scale = cache.kv_pool(self.cache_index)
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (docs/model.md §4); state lives in the cache's state slots."""

    PROJECTIONS = ("in_proj_qkvz", "in_proj_ba")

    def __init__(self, cfg: ModelConfig, cache_index: int) -> None:
        super().__init__()
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.eps = cfg.rms_norm_eps
        # Checkpoint layout, interleaved per key-head group g: in_proj_qkvz rows [q_g | k_g | v_g | z_g],
        # in_proj_ba rows [b_g | a_g], each value part holding Hv/Hk heads.
        self.in_proj_qkvz = nn.Linear(cfg.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(cfg.hidden_size, 2 * self.Hv, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.linear_conv_kernel_dim, groups=cfg.conv_dim,
                                bias=False)  # only its weight [conv_dim, 1, K] is used
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.dv))
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)
        self.cache_index = cache_index  # which DeltaNet state pool of CacheTensors this layer owns

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        qkvz, ba = project(self, x)
        if deltanet_cpu.runs(x, cache.ssm_state.dtype):
            o = self._cpu_token_steps(qkvz, ba, batch, cache)
        else:
            o = self._mix(qkvz, ba, batch.state_slots, batch.query_lens, batch.has_initial_state, batch.is_verify,
                          cache, batch.kernel_meta)
        return self.out_proj(o)

    def _mix(self, qkvz: torch.Tensor, ba: torch.Tensor, state_slots: torch.Tensor, query_lens: list[int],
             has_initial_state: list[bool], is_verify: list[bool] | None, cache: CacheTensors,
             kernel_meta: StepMetadata | None) -> torch.Tensor:
        """The projections -> the gated-norm rows [T, value_dim] out_proj reads: conv, gates, gated delta rule and
        norm as separate kernels (Triton on CUDA, the torch references elsewhere)."""
        T = qkvz.shape[0]
        r = self.Hv // self.Hk
        q, k, v, z = qkvz.reshape(T, self.Hk, 2 * self.dk + 2 * r * self.dv).split(
            [self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = ba.reshape(T, self.Hk, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)  # [T, conv_dim]
        spec_conv = cache.spec_conv[self.cache_index] if cache.spec_conv is not None else None
        spec_ssm = cache.spec_ssm[self.cache_index] if cache.spec_ssm is not None else None
        mixed = causal_conv1d_varlen(mixed, self.conv1d.weight[:, 0], cache.conv_state[self.cache_index],
                                     state_slots, query_lens, has_initial_state, is_verify, spec_conv, kernel_meta)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(T, self.Hk, self.dk)  # value head h reads key head h // r, inside the kernel
        k = k.reshape(T, self.Hk, self.dk)
        v = v.reshape(T, self.Hv, self.dv)
        beta = torch.sigmoid(b.reshape(T, self.Hv))
        ct = torch.promote_types(qkvz.dtype, torch.float32)  # fp32 even for bf16 weights: A_log.exp() overflows fp16
        g = -self.A_log.to(ct).exp() * F.softplus(a.reshape(T, self.Hv).to(ct) + self.dt_bias.to(ct))  # [T, Hv]
        o = gated_delta_rule_varlen(q, k, v, g, beta, cache.ssm_state[self.cache_index], state_slots,
                                    query_lens, has_initial_state, is_verify, spec_ssm, kernel_meta)  # [T, Hv, dv]
        o = gated_rms_norm(o, z.reshape(T, self.Hv, self.dv), self.norm.weight, self.eps)
        return o.reshape(T, self.value_dim)

    def _cpu_token_steps(self, qkvz: torch.Tensor, ba: torch.Tensor, batch: ForwardBatch,
                         cache: CacheTensors) -> torch.Tensor:
        """_mix's rows with the decode and verify rows from the C token steps (kernels/cpu/deltanet.py) and only the
        prefill chunks through _mix (on their own rows: each sequence's result is its own)."""
        seqs, prefill, rows = batch.token_step_seqs
        if not seqs.shape[0]:
            return self._mix(qkvz, ba, batch.state_slots, batch.query_lens, batch.has_initial_state, None, cache,
                             None)
        out = torch.empty(qkvz.shape[0], self.value_dim, dtype=qkvz.dtype)
        i = self.cache_index
        deltanet_cpu.token_steps(
            qkvz, ba, seqs, (self.Hk, self.Hv, self.dk, self.dv), *self._fp32_params(), self.eps,
            cache.conv_state[i], cache.ssm_state[i], cache.spec_conv[i] if cache.spec_conv is not None else None,
            cache.spec_ssm[i] if cache.spec_ssm is not None else None, out)
        if rows is not None:
            out[rows] = self._mix(qkvz[rows], ba[rows], batch.state_slots[prefill],
                                  [batch.query_lens[j] for j in prefill],
                                  [batch.has_initial_state[j] for j in prefill], None, cache, None)
        return out

    def _fp32_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv weight [K, D], -exp(A_log), dt_bias, norm weight) in fp32 for the C token steps, made again
        only when a parameter changes (a reload)."""
        return fp32_copies(self, (self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight),
                           lambda w, A_log, dt_bias, norm: (w[:, 0].float().t().contiguous(),
                                                            (-A_log.float().exp()).contiguous(),
                                                            dt_bias.float().contiguous(), norm.float().contiguous()))


class MLP(nn.Module):
    PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, x)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """The routed experts, stacked per projection (the loader stacks the checkpoint's per-expert tensors).

    For FP8 weights kept on the device, `worker/fp8.py` adds `*_scale_inv` block scales beside each.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.is_fp8 = False

    @property
    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.is_fp8:
            return None
        return self.w_gate_scale_inv, self.w_up_scale_inv, self.w_down_scale_inv

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, weights, ids, self.w_gate, self.w_up, self.w_down, self.scales)


class SparseMoE(nn.Module):
    """softmax router -> top-k (renormalised) routed experts + sigmoid-gated shared expert (docs/model.md §6)."""

    PROJECTIONS = ("gate", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert_gate")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("fused_forward")  # a small MoE on a CPU: worker/cpu_linear.py's PackedDenseMoE
        if fused is not None:
            return fused(x)
        router_logits, shared_gate, shared_up, shared_weight = project(self, x)
        weights, ids = route_logits(router_logits, self.top_k, self.norm_topk_prob)
        routed = self.experts(x, weights, ids)
        shared = self.shared_expert.down_proj(F.silu(shared_gate) * shared_up)
        return routed + torch.sigmoid(shared_weight) * shared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, cache_index: int, is_moe: bool) -> None:
        super().__init__()
        self.is_attention = layer_type == FULL_ATTENTION
        if self.is_attention:
            self.self_attn = GatedAttention(cfg, cache_index)
        else:
            self.linear_attn = GatedDeltaNet(cfg, cache_index)
        self.mlp = SparseMoE(cfg) if is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, cache: CacheTensors,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's hidden state comes and goes as two parts, x + residual (residual None: all in x), so each
        residual add happens in the norm after it (one pass instead of an add and a norm). Returns (mlp output,
        residual): the caller adds them, or hands them to the next layer."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = add_rms_norm(x, residual, self.input_layernorm)
        if self.is_attention:
            h = self.self_attn(h, batch, cache, cos, sin)
        else:
            h = self.linear_attn(h, batch, cache)
        h, residual = add_rms_norm(h, residual, self.post_attention_layernorm)
        return self.mlp(h), residual


class TransformerBody(nn.Module):
    """`model.*`: embeddings, the 48 (here: num_hidden_layers) decoder layers and the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attn_idx = gdn_idx = 0
        layers = []
        for i, t in enumerate(cfg.layer_types):
            if t == FULL_ATTENTION:
                layers.append(DecoderLayer(cfg, t, attn_idx, cfg.is_moe_layer(i)))
                attn_idx += 1
            else:
                layers.append(DecoderLayer(cfg, t, gdn_idx, cfg.is_moe_layer(i)))
                gdn_idx += 1
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MtpHead(nn.Module):
    """`mtp.*` (docs/model.md §7): x = fc([norm(embed(t_{p+1})) | norm(h_p)]) -> one full-attention MoE layer -> norm.

    It shares `model.embed_tokens` and `lm_head` with the main model; its attention layer has its own KV pool,
    placed after the main model's full-attention pools.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        first_pool = len(cfg.full_attention_layers)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, FULL_ATTENTION, first_pool + j, cfg.num_experts > 0) for j in range(cfg.num_mtp_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TransformerBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MtpHead(cfg) if cfg.num_mtp_layers > 0 else None
        self.rotary = RotaryEmbedding(cfg)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: CacheTensors) -> torch.Tensor:
        """Returns the final hidden states after `model.norm`: [T, H] (what MTP drafts from)."""
        x = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, batch, cache, cos, sin)
        return add_rms_norm(x, residual, self.model.norm)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] in the model's dtype: the sampler converts to float32 where it computes on them, and a
        greedy batch's argmax needs no [N, V] float32 copy (engine step at batch 16 on the 2-core box, with and
        without the copy in alternate steps: 0.976)."""
        return self.lm_head(hidden)

    @torch.inference_mode()
    def mtp_forward(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
                    cache: CacheTensors, step: int = 0) -> torch.Tensor:
        """One MTP pass. Row p pairs token t_{p+1} with the target's final hidden state h_p at position p
        (batch.positions); returns the MTP's hidden states after `mtp.norm`: [T, H]."""
        x = self._mtp_input(next_token_ids, hidden)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        x, residual = self.mtp.layers[step % len(self.mtp.layers)](x, None, batch, cache, cos, sin)
        return add_rms_norm(x, residual, self.mtp.norm)[0]

    @torch.inference_mode()
    def mtp_write_kv(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
                     cache: CacheTensors, step: int = 0) -> None:
        """What `mtp_forward` leaves in the MTP's KV cache for these rows, without its attention and MoE: for
        rows no draft is proposed from (worker/spec_decode.py's catch-up), whose K/V later rows still read."""
        x = self._mtp_input(next_token_ids, hidden)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        layer = self.mtp.layers[step % len(self.mtp.layers)]
        layer.self_attn.write_kv(layer.input_layernorm(x), batch, cache, cos, sin)

    def _mtp_input(self, next_token_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """fc([norm(embed(t_{p+1})) | norm(h_p)]): the MTP layer's input rows."""
        assert self.mtp is not None, "this checkpoint has no MTP head"
        e = self.mtp.pre_fc_norm_embedding(self.model.embed_tokens(next_token_ids))
        h = self.mtp.pre_fc_norm_hidden(hidden)
        return self.mtp.fc(torch.cat([e, h], dim=-1))
