"""Triton paged attention vs the torch reference over varlen batches: decodes, prefill chunks of 1, 63, 64, 65 and
200 tokens with and without a prefix already in the cache, a speculative-verify chunk, an empty sequence; block
size 16 with shuffled (non-contiguous) block tables; GQA 2:1 and Qwen3-Next's 8:1 at head_dim 256. Outputs are
NaN-filled, and so is every cache slot that holds nothing: a read of one poisons the output, and the pools must
come back equal to the reference's (only this step's slots written). On a machine without CUDA the kernels run on
CPU through the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels below
triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402

from qnext.kernels import attention, dispatch  # noqa: E402
from qnext.kernels.attention import reference  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bitwise equal, NaN where NaN."""
    return torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def make_batch(query_lens: list[int], context_lens: list[int], Hq: int, Hkv: int, D: int, dtype: torch.dtype,
               seed: int = 0):
    """Caches NaN everywhere except each sequence's prefix (context - query positions, random), shuffled block
    tables padded with -1, and this step's q/k/v with their slots."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // BLOCK) for c in context_lens]
    num_blocks = sum(need) + 5  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need + [1])
    tables = torch.full((len(query_lens), width), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, BLOCK, Hkv, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots = []
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        own = [perm.pop() for _ in range(need[i])]
        tables[i, :len(own)] = torch.tensor(own, dtype=torch.int32)
        flat = [own[p // BLOCK] * BLOCK + p % BLOCK for p in range(c)]
        prefix = flat[:c - n]
        k_cache.view(-1, Hkv, D)[prefix] = torch.randn(len(prefix), Hkv, D, generator=gen).to(dtype)
        v_cache.view(-1, Hkv, D)[prefix] = torch.randn(len(prefix), Hkv, D, generator=gen).to(dtype)
        slots += flat[c - n:]
    T = sum(query_lens)
    q, k, v = (torch.randn(T, h, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    to = (lambda t: t.to(DEVICE))
    return to(q), to(k), to(v), to(k_cache), to(v_cache), to(torch.tensor(slots, dtype=torch.int64)), to(tables)


def run_both(query_lens: list[int], context_lens: list[int], Hq: int, Hkv: int, D: int, dtype: torch.dtype,
             seed: int = 0, num_splits: int = 1) -> float:
    q, k, v, k_cache, v_cache, slots, tables = make_batch(query_lens, context_lens, Hq, Hkv, D, dtype, seed)
    scale = D ** -0.5
    # The reference pads decodes to the longest context and masks scores, which still multiplies NaN by 0:
    # it gets the same caches with the empty slots zeroed.
    k_ref, v_ref = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    want = reference.paged_attention_varlen(q, k, v, k_ref, v_ref, slots, tables, query_lens, context_lens, scale)
    from qnext.kernels.attention.triton_attention import paged_attention_fwd, write_kv_fwd
    out = torch.full_like(q, float("nan"))
    write_kv_fwd(k, v, k_cache, v_cache, slots)
    got = paged_attention_fwd(q, k_cache, v_cache, tables, query_lens, context_lens, scale, out=out,
                              num_splits=num_splits)
    assert got is out and torch.isfinite(got).all()
    for cache, ref, new in ((k_cache, k_ref, k), (v_cache, v_ref, v)):
        expect = torch.where(ref == 0, cache, ref)  # the poisoned slots stay NaN, the written ones hold `new`
        expect.view(-1, *new.shape[1:])[slots] = new
        assert same(cache, expect)
    err = rel_err(got, want)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    return err


QUERY_LENS = [1, 63, 64, 1, 65, 200, 3, 0, 1]
CONTEXT_LENS = [37, 63, 100, 1, 81, 230, 50, 20, 129]  # prefix in cache = context - query


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_prefill_decode_mix(dtype: torch.dtype, report) -> None:
    err = run_both(QUERY_LENS, CONTEXT_LENS, Hq=4, Hkv=2, D=40, dtype=dtype)  # D = 40: a masked head-dim tile
    report(f"paged attention varlen mix {dtype}, rel err", f"{err:.1e}")


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv(num_splits: int, report) -> None:
    """Keys split across programs and merged by log-sum-exp; with 5 splits the short contexts leave some
    splits without a key (and the causal rows of a prefill tile without one in the late splits)."""
    err = run_both([1, 1, 17, 4, 1], [300, 1, 100, 33, 40], Hq=4, Hkv=2, D=40, dtype=torch.float32, seed=3,
                   num_splits=num_splits)
    report(f"paged attention split-KV x{num_splits}, rel err", f"{err:.1e}")


@pytest.mark.parametrize("query_lens,context_lens,num_splits", [([1] * 5, [1, 17, 64, 65, 300], 3),  # decode only
                                                                ([4, 1, 4], [20, 33, 4], 1)])  # verify chunks
def test_qwen3_next_heads(query_lens: list[int], context_lens: list[int], num_splits: int, report) -> None:
    """16 query heads over 2 KV heads of 256: the 8-head groups fill the rows of one tile."""
    err = run_both(query_lens, context_lens, Hq=16, Hkv=2, D=256, dtype=torch.bfloat16, seed=1,
                   num_splits=num_splits)
    report(f"paged attention 16q/2kv x 256 lens {query_lens} splits {num_splits}, rel err", f"{err:.1e}")


def test_chunked_prefill_equals_one_shot() -> None:
    """A 130-token prompt in chunks [64, 1, 65] through the public function gives the one-shot result."""
    q, k, v, k_cache, v_cache, slots, tables = make_batch([130], [130], 4, 2, 32, torch.float32, seed=2)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    with dispatch.force_triton():
        one = attention.paged_attention_varlen(q, k, v, k_cache.clone(), v_cache.clone(), slots, tables, [130],
                                               [130], 0.2)
        parts, s = [], 0
        for n in (64, 1, 65):
            parts.append(attention.paged_attention_varlen(q[s:s + n], k[s:s + n], v[s:s + n], k_cache, v_cache,
                                                          slots[s:s + n], tables, [n], [s + n], 0.2))
            s += n
    assert torch.allclose(torch.cat(parts), one, atol=1e-6)


def test_step_without_new_tokens() -> None:
    """Only empty sequences: nothing written, nothing launched, an empty output."""
    q, k, v, k_cache, v_cache, slots, tables = make_batch([0, 0], [5, 0], 4, 2, 32, torch.float32)
    before = k_cache.clone()
    with dispatch.force_triton():
        out = attention.paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, [0, 0], [5, 0], 0.2)
    assert out.shape == (0, 4, 32) and same(k_cache, before)
