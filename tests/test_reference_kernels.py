"""The torch reference kernels against naive loops written here (fp64): varlen batches mixing decodes,
prefills of odd lengths around the chunk size, and speculative-verify chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qnext.kernels.conv1d.reference import causal_conv1d_varlen
from qnext.kernels.gated_delta_rule.reference import gated_delta_rule_varlen

LENS = [1, 63, 64, 1, 65, 200, 3]
INIT = [True, False, True, True, True, False, True]
# (lengths, has initial state, verify, slots): the mix above with one verify chunk; then verify chunks of one
# length (batched together) on consecutive slots (advanced in the pool's own rows) and on scattered ones, next to
# a verify chunk of another length, a decode, and two prefill chunks of one length (one fresh, one continued)
BATCHES = {
    "mixed": (LENS, INIT, [False] * 6 + [True], [7, 2, 0, 9, 4, 1, 5]),
    "verify-consecutive": ([3, 1, 3, 3, 2, 5, 5], [True] * 5 + [False, True], [True, False, True, True, True, False,
                                                                               False], [3, 9, 4, 5, 0, 7, 8]),
    "verify-scattered": ([3, 1, 3, 3, 2, 5, 5], [True] * 5 + [False, True], [True, False, True, True, True, False,
                                                                             False], [6, 9, 1, 8, 0, 3, 2]),
}


def naive_delta(q, k, v, g, beta, S):
    """Token-by-token gated delta rule of docs/model.md §4.4 for one sequence; S [H, dk, dv]."""
    outs = []
    for t in range(q.shape[0]):
        # l2norm with the model's eps: x / sqrt(sum(x^2) + 1e-6)
        qt = q[t] / (q[t].pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() * q.shape[-1] ** -0.5
        kt = k[t] / (k[t].pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        S = S * g[t].exp()[:, None, None]
        u = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", S, kt))
        S = S + torch.einsum("hk,hv->hkv", kt, u)
        outs.append(torch.einsum("hkv,hk->hv", S, qt))
    return torch.stack(outs), S


@pytest.mark.parametrize("batch", list(BATCHES))
def test_gated_delta_rule_varlen_matches_naive(batch):
    LENS, INIT, verify, slots = BATCHES[batch]
    gen = torch.Generator().manual_seed(0)
    H, dk, dv, T = 3, 8, 5, sum(LENS)
    q, k = torch.randn(T, H, dk, generator=gen, dtype=torch.float64), torch.randn(T, H, dk, generator=gen,
                                                                                   dtype=torch.float64)
    v = torch.randn(T, H, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(T, H, generator=gen, dtype=torch.float64)
    pool = torch.randn(10, H, dk, dv, generator=gen, dtype=torch.float64)
    slots = torch.tensor(slots)
    spec = torch.full((10, 4, H, dk, dv), float("nan"), dtype=torch.float64)
    before = pool.clone()
    out = gated_delta_rule_varlen(q, k, v, g, beta, pool, slots, LENS, INIT, verify, spec)
    s = 0
    for i, n in enumerate(LENS):
        S0 = before[slots[i]] if INIT[i] else torch.zeros(H, dk, dv, dtype=torch.float64)
        o, S = naive_delta(q[s:s + n], k[s:s + n], v[s:s + n], g[s:s + n], beta[s:s + n], S0)
        assert torch.allclose(out[s:s + n], o, atol=1e-10), i
        assert torch.allclose(pool[slots[i]], S, atol=1e-10), i
        if verify[i]:
            for j in range(n - 1):  # the state after each position but the last is kept for rollback
                _, Sj = naive_delta(q[s:s + j + 1], k[s:s + j + 1], v[s:s + j + 1], g[s:s + j + 1],
                                    beta[s:s + j + 1], S0)
                assert torch.allclose(spec[slots[i], j], Sj, atol=1e-10)
        s += n
    untouched = [x for x in range(10) if x not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    assert spec[slots[~torch.tensor(verify)]].isnan().all()  # written for verify chunks alone


@pytest.mark.parametrize("batch", list(BATCHES))
def test_conv1d_varlen_matches_naive(batch):
    LENS, INIT, verify, slots = BATCHES[batch]
    gen = torch.Generator().manual_seed(1)
    D, K, T = 6, 4, sum(LENS)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w = torch.randn(D, K, generator=gen, dtype=torch.float64)
    pool = torch.randn(10, K - 1, D, generator=gen, dtype=torch.float64)  # time-major states
    slots = torch.tensor(slots)
    spec = torch.full((10, 4, K - 1, D), float("nan"), dtype=torch.float64)
    before = pool.clone()
    out = causal_conv1d_varlen(x, w, pool, slots, LENS, INIT, verify, spec)
    s = 0
    for i, n in enumerate(LENS):
        hist = before[slots[i]].t() if INIT[i] else torch.zeros(D, K - 1, dtype=torch.float64)
        seq = torch.cat([hist, x[s:s + n].t()], 1)  # [D, K-1+n]
        want = torch.stack([F.silu((seq[:, t:t + K] * w).sum(-1)) for t in range(n)])
        assert torch.allclose(out[s:s + n], want, atol=1e-12), i
        assert torch.equal(pool[slots[i]], seq[:, -(K - 1):].t()), i
        if verify[i]:
            for j in range(n - 1):
                assert torch.equal(spec[slots[i], j], seq[:, j + 1:j + K].t())
        s += n
    untouched = [x for x in range(10) if x not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    assert spec[slots[~torch.tensor(verify)]].isnan().all()  # written for verify chunks alone


@pytest.mark.parametrize("slots", [[8, 1, 5, 3], [3, 4, 5, 6]], ids=["scattered", "consecutive"])
@pytest.mark.parametrize("H, dk, init", [(3, 8, [True, False, True, True]), (8, 64, [True, True, True, True]),
                                         (8, 64, [True, False, True, False])])
def test_pure_decode_steps_match_naive(H, dk, init, slots):
    """Every sequence one token (the decode step's own path, no row gathers), with states both below and above
    SMALL_STATE (the broadcast form and the batched-matmul form), fresh sequences mixed in or not, and slots
    scattered (gathered and scattered back) or consecutive (the pool's rows advanced in place)."""
    from qnext.kernels.gated_delta_rule.reference import SMALL_STATE
    gen = torch.Generator().manual_seed(2)
    B, dv = len(init), dk
    f64 = dict(generator=gen, dtype=torch.float64)
    q, k, v = torch.randn(B, H, dk, **f64), torch.randn(B, H, dk, **f64), torch.randn(B, H, dv, **f64)
    g, beta = -torch.rand(B, H, **f64), torch.rand(B, H, **f64)
    pool = torch.randn(9, H, dk, dv, **f64)
    slots = torch.tensor(slots)
    before = pool.clone()
    out = gated_delta_rule_varlen(q, k, v, g, beta, pool, slots, [1] * B, init)
    assert (B * H * dk * dv > SMALL_STATE) == (dk == 64)  # both forms are exercised
    for i in range(B):
        S0 = before[slots[i]] if init[i] else torch.zeros(H, dk, dv, dtype=torch.float64)
        o, S = naive_delta(q[i:i + 1], k[i:i + 1], v[i:i + 1], g[i:i + 1], beta[i:i + 1], S0)
        assert torch.allclose(out[i], o[0], atol=1e-10) and torch.allclose(pool[slots[i]], S, atol=1e-10), i
    untouched = [x for x in range(9) if x not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])
    D, K = 6, 4
    x, w = torch.randn(B, D, **f64), torch.randn(D, K, **f64)
    cpool = torch.randn(9, K - 1, D, **f64)  # time-major states
    cbefore = cpool.clone()
    y = causal_conv1d_varlen(x, w, cpool, slots, [1] * B, init)
    for i in range(B):
        hist = cbefore[slots[i]].t() if init[i] else torch.zeros(D, K - 1, dtype=torch.float64)
        seq = torch.cat([hist, x[i:i + 1].t()], 1)
        assert torch.allclose(y[i], F.silu((seq * w).sum(-1)), atol=1e-12) and \
            torch.equal(cpool[slots[i]], seq[:, 1:].t())


def test_paged_attention_matches_naive():
    """Decodes and prefill chunks mixed, GQA (query head h reads KV head h // 2), shuffled block tables: every
    query row against a per-row softmax loop over its sequence's positions 0..its own (fp64); the new keys and
    values land in the cache at their slots. Two 3-token chunks at different context lengths share one padded
    call; the 70-token chunk (over BATCHED_CHUNK_MAX) runs alone."""
    from qnext.kernels.attention.reference import paged_attention_varlen
    gen = torch.Generator().manual_seed(5)
    f64 = dict(generator=gen, dtype=torch.float64)
    bs, Hq, Hkv, D = 4, 4, 2, 8
    query_lens, context_lens = [1, 5, 1, 9, 3, 3, 70], [7, 5, 1, 20, 11, 4, 80]
    need = [-(-c // bs) for c in context_lens]
    perm = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables = torch.full((len(need), max(need)), -1, dtype=torch.int32)
    k_cache, v_cache = torch.randn(len(perm), bs, Hkv, D, **f64), torch.randn(len(perm), bs, Hkv, D, **f64)
    slot_of = []  # per sequence: flat slot of each position
    for i, n in enumerate(need):
        own = [perm.pop() for _ in range(n)]
        tables[i, :n] = torch.tensor(own, dtype=torch.int32)
        slot_of.append([own[p // bs] * bs + p % bs for p in range(context_lens[i])])
    slots = torch.tensor([s for i, n in enumerate(query_lens) for s in slot_of[i][context_lens[i] - n:]])
    T = sum(query_lens)
    q, k, v = torch.randn(T, Hq, D, **f64), torch.randn(T, Hkv, D, **f64), torch.randn(T, Hkv, D, **f64)
    scale = D ** -0.5
    out = paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, query_lens, context_lens, scale)
    rows = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    assert torch.equal(rows[0][slots], k) and torch.equal(rows[1][slots], v)
    t = 0
    for i, n in enumerate(query_lens):
        for j in range(n):
            p = context_lens[i] - n + j  # this query's position: it sees positions 0..p
            keys, values = rows[0][slot_of[i][:p + 1]], rows[1][slot_of[i][:p + 1]]  # [p + 1, Hkv, D]
            for h in range(Hq):
                w = torch.softmax(keys[:, h // 2] @ q[t, h] * scale, dim=0)
                assert torch.allclose(out[t, h], w @ values[:, h // 2], atol=1e-12), (i, j, h)
            t += 1
