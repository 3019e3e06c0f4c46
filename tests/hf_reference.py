"""transformers' Qwen3NextForCausalLM as the independent numerical reference (test-time only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def small_config(**overrides: Any) -> dict[str, Any]:
    cfg = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=3,
               moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=96,
               full_attention_interval=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.25},
               max_position_embeddings=4096)
    cfg.update(overrides)
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """HF's init leaves norms at 0/1 and A_log uniform; give every parameter a non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                # moderate decay (A in [0.05, 1]): strong decay makes some heads' outputs tiny, and the gated
                # RMSNorm then amplifies fp32 rounding far beyond what the comparison is about
                p.copy_(torch.log(0.05 + 0.95 * torch.rand(p.shape, generator=gen)))
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linear / stacked experts: fan-in scaling keeps activations O(1)
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def make_hf_checkpoint(out_dir: Path, seed: int = 0, **overrides: Any):
    """Random HF model saved with save_pretrained; returns the (fp32, eval) HF model too."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**small_config(**overrides))).float().eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model
