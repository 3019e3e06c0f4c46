"""The MTP head (docs/model.md §7) against a plain-torch re-derivation written here from the checkpoint tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from paged_runner import PagedRunner
from qnext.worker.loader import load_model
from qnext.worker.tiny import make_checkpoint, tiny_config


def zc_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def mtp_by_hand(W: dict[str, torch.Tensor], cfg: dict, next_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    T, D, nh, nkv = len(next_ids), cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    e = zc_norm(W["model.embed_tokens.weight"][next_ids], W["mtp.pre_fc_norm_embedding.weight"])
    x = torch.cat([e, zc_norm(h, W["mtp.pre_fc_norm_hidden.weight"])], -1) @ W["mtp.fc.weight"].t()
    p = "mtp.layers.0."
    y = zc_norm(x, W[p + "input_layernorm.weight"])
    qg = (y @ W[p + "self_attn.q_proj.weight"].t()).view(T, nh, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    q = zc_norm(q, W[p + "self_attn.q_norm.weight"])
    k = zc_norm((y @ W[p + "self_attn.k_proj.weight"].t()).view(T, nkv, D), W[p + "self_attn.k_norm.weight"])
    v = (y @ W[p + "self_attn.v_proj.weight"].t()).view(T, nkv, D)
    rd = int(D * cfg["partial_rotary_factor"])
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t: torch.Tensor) -> torch.Tensor:  # NeoX halves on the first rd dims
        a, b, rest = t[..., : rd // 2], t[..., rd // 2: rd], t[..., rd:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s, rest], -1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    o = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, nh * D) * torch.sigmoid(gate.reshape(T, -1))
    x = x + o @ W[p + "self_attn.o_proj.weight"].t()
    y = zc_norm(x, W[p + "post_attention_layernorm.weight"])
    probs = (y @ W[p + "mlp.gate.weight"].t()).softmax(-1)
    top_w, top_i = probs.topk(cfg["num_experts_per_tok"], -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    moe = torch.zeros_like(y)
    for t in range(T):
        for wt, e in zip(top_w[t], top_i[t].tolist()):
            ep = f"{p}mlp.experts.{e}."
            a = F.silu(y[t] @ W[ep + "gate_proj.weight"].t()) * (y[t] @ W[ep + "up_proj.weight"].t())
            moe[t] += wt * (a @ W[ep + "down_proj.weight"].t())
    sp = p + "mlp.shared_expert."
    shared = (F.silu(y @ W[sp + "gate_proj.weight"].t()) * (y @ W[sp + "up_proj.weight"].t())) @ W[
        sp + "down_proj.weight"].t()
    x = x + moe + torch.sigmoid(y @ W[p + "mlp.shared_expert_gate.weight"].t()) * shared
    return zc_norm(x, W["mtp.norm.weight"]) @ W["lm_head.weight"].t()


def test_mtp_logits_match_plain_torch(tmp_path):
    cfg = tiny_config(vocab_size=512)
    d = make_checkpoint(tmp_path, cfg, seed=5, tokenizer=False)
    model = load_model(d, dtype=torch.float32)  # compared with float32 plain torch
    assert model.mtp is not None and model.config.num_mtp_layers == 1  # no count in config.json: from mtp.* tensors
    W = {}
    for shard in d.glob("*.safetensors"):
        W |= {n: t.float() for n, t in load_file(shard).items()}
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(0))
    r = PagedRunner(model)
    batch = r.batch([(r.new_seq(), ids.tolist())])
    hidden = model(batch, r.cache)  # target's final hidden states h_p (after model.norm)
    next_ids = torch.cat([ids[1:], torch.tensor([7])])  # row p pairs t_{p+1} with h_p
    ours = model.compute_logits(model.mtp_forward(next_ids, hidden, batch, r.cache))
    ref = mtp_by_hand(W, cfg, next_ids, hidden)
    assert (ours - ref).abs().max().item() <= 1e-4
