"""The roofline of a decode step: the fewest bytes it must move (weights read once, counting only the experts its
tokens touch; the DeltaNet states read and written; the KV read) over the device's measured copy bandwidth."""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters by kind (FP8 scales included with their weights)."""
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        kind = ("embedding" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head") else
                "mtp_experts" if name.startswith("mtp.") and ".experts." in name else
                "mtp_other" if name.startswith("mtp.") else "experts" if ".experts." in name else "other")
        out[kind] += p.numel() * p.element_size()
    out["total"] = sum(out.values())
    return dict(out)


def decode_floor_bytes(model, cache, wb: dict[str, int], batch: int, context: int) -> dict[str, float]:
    """The fewest bytes one decode step of `batch` sequences at `context` tokens must move: every non-expert
    weight once (the embedding only its rows), the experts that batch x top-k random routings touch (expected
    distinct count), the DeltaNet conv + recurrent states read and written, the KV of the context read and the
    new K/V written. The MTP head is outside (k=0 step)."""
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** batch)
    experts = wb.get("experts", 0) * touched / E
    H = cfg.hidden_size
    embed_rows = batch * H * model.model.embed_tokens.weight.element_size()
    per_slot = sum(t[:, 0].numel() * t.element_size() for t in (cache.conv_state, cache.ssm_state))
    states = 2 * batch * per_slot
    kv_token = sum(p[0, 0].numel() * p.element_size() for p in (*cache.k_cache, *cache.v_cache))
    n_main_pools = len(cfg.full_attention_layers)
    kv_token = kv_token * n_main_pools // max(1, len(cache.k_cache))  # the MTP layer's pool is not read here
    kv = batch * (context * kv_token + kv_token)
    parts = dict(weights_dense=wb.get("other", 0) + wb.get("lm_head", 0), embedding_rows=embed_rows,
                 experts=experts, experts_touched=touched, deltanet_states=states, kv=kv)
    parts["total"] = parts["weights_dense"] + embed_rows + experts + states + kv
    return parts


def copy_gbps(device: torch.device) -> float:
    """Device copy bandwidth: read + write of a 1 GiB buffer (median of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()  # the engines size their caches from free memory
    return 2 * (1 << 30) / statistics.median(times) / 1e9


def roofline(model, cache, wb: dict[str, int], batch: int, context: int, row: dict, gbps: float) -> dict:
    """The floor of a measured decode row (its median step and tokens per step) at `gbps`, and how close it came."""
    floor = decode_floor_bytes(model, cache, wb, batch, context)
    floor_ms = floor["total"] / (gbps * 1e9) * 1e3
    return dict(bytes=floor, floor_ms_per_step=round(floor_ms, 4), floor_tok_s=round(batch / floor_ms * 1e3, 1),
                pct_of_roofline=round(100 * floor_ms * row["tokens_per_step"] / row["step_ms_median"], 2))
