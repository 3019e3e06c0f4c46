"""worker/greedy_screen.py: the int8 screen's greedy tokens are the full bf16 head's argmax (row_argmax over
kernels/cpu/lm_head.c's logits, first index among equals) on random rows, exact ties, near ties and rows of any
scale; its bound holds against float64 logits; it steps aside (None) where it cannot decide cheaply; and in the
engine a greedy request's tokens do not change with it."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels.cpu import int8_head as int8_head_cpu
from qnext.kernels.cpu import lm_head as lm_head_cpu
from qnext.worker import greedy_screen
from qnext.worker.draft_head import quantize_rows
from qnext.worker.engine import Engine
from qnext.worker.greedy_screen import GreedyScreen
from qnext.worker.sampler import row_argmax
from qnext.worker.tiny import default_checkpoint
from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams

pytestmark = [pytest.mark.usefixtures("cpu_kernels_built"),
              pytest.mark.skipif(not lm_head_cpu.available(), reason="library built without AVX512-BF16")]


def screen_of(w: torch.Tensor) -> GreedyScreen:
    """The screen of any head (the constructor: no width gate, so small test heads work)."""
    qweight, scale = quantize_rows(w)
    return GreedyScreen(w, lm_head_cpu.pack(w), int8_head_cpu.pack(qweight, scale))


def full_argmax(x: torch.Tensor, w: torch.Tensor) -> list[int]:
    return row_argmax(lm_head_cpu.lm_head(x, lm_head_cpu.pack(w), w.shape[0])).tolist()


@pytest.mark.parametrize("V,H", [(2003, 64), (4096, 256)])
def test_random_rows_give_the_full_heads_argmax(V: int, H: int) -> None:
    g = torch.Generator().manual_seed(V + H)
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    screen = screen_of(w)
    for trial in range(60):
        scale = (1e-3, 1.0, 30.0)[trial % 3]
        x = (torch.randn(1 + trial % 3, H, generator=g) * scale).bfloat16()
        assert screen.screen(x) == full_argmax(x, w), trial


def test_exact_ties_take_the_first_index() -> None:
    g = torch.Generator().manual_seed(5)
    V, H = 1000, 64
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    x = torch.randn(1, H, generator=g).bfloat16()
    best = full_argmax(x, w)[0]
    for twin in (3, V - 1):  # the same weight row before and after the winner: equal logits
        w2 = w.clone()
        w2[twin] = w[best]
        want = min(twin, best)
        assert full_argmax(x, w2) == [want]
        assert screen_of(w2).screen(x) == [want]


def test_near_ties_follow_the_bf16_logits() -> None:
    """Rows one bf16 step apart in one weight: logits closer than the int8 error (the screen alone cannot order
    them), so the exact pass decides, as the full head does (its bf16 rounding may also make them equal)."""
    g = torch.Generator().manual_seed(6)
    V, H = 1500, 256
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    for trial in range(20):
        x = torch.randn(1, H, generator=g).bfloat16()
        best = full_argmax(x, w)[0]
        w2 = w.clone()
        for j, step in ((trial, 1), (V - 1 - trial, -1)):
            w2[j] = w[best]
            col = int(torch.randint(0, H, (1,), generator=g))
            w2[j, col] = torch.nextafter(w2[j, col].float(), torch.tensor(step * float("inf"))).bfloat16()
        assert screen_of(w2).screen(x) == full_argmax(x, w2), trial


def test_the_bound_holds_against_float64_logits() -> None:
    """|a_v - x . w_v| <= E for the int8 logits a and exact dot products, rows of any scale and with outliers."""
    g = torch.Generator().manual_seed(7)
    V, H = 3000, 256
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    w[17] *= 40  # a row far larger than the rest (its scale is the maximum the bound uses)
    screen = screen_of(w)
    for scale in (1e-4, 1.0, 1e3):
        x = (torch.randn(4, H, generator=g) * scale).bfloat16()
        x[1, 5] *= 200  # an outlier activation
        a = int8_head_cpu.int8_head(x.float(), screen.int8).double()
        exact = x.double() @ w.double().T
        xa = x.float().abs()
        bounds = torch.tensor(screen.bounds(xa.sum(dim=1).tolist(), xa.amax(dim=1).tolist()), dtype=torch.float64)
        err = (a - exact).abs().amax(dim=1)
        assert bool((err <= bounds).all()), (scale, err, bounds)
        assert bool((err > bounds / 100).any()), "the bound is not meant to be that loose"


def test_it_steps_aside_where_it_cannot_decide_cheaply() -> None:
    g = torch.Generator().manual_seed(8)
    V, H = 3000, 64
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    x = torch.randn(1, H, generator=g).bfloat16()
    bad = x.clone()
    bad[0, 3] = float("nan")
    assert screen_of(w).screen(bad) is None  # not finite: the full head (and row_argmax's NaN rule) decide
    for n in (3000, 6000):  # every logit within the int8 error of the max: all candidates
        flat = w[:1].expand(n, H).clone()
        flat[:, 0] += (torch.arange(n) % 7).bfloat16() * 1e-3
        got = screen_of(flat).screen(x)
        # up to MAX_CANDIDATES a row the exact pass still pays off; past it the full head is the cheaper one
        assert got == (full_argmax(x, flat) if n <= greedy_screen.MAX_CANDIDATES else None), n


def test_it_steps_aside_when_the_c_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    w = (torch.randn(1000, 64) * 0.05).bfloat16()
    screen, x = screen_of(w), torch.randn(1, 64).bfloat16()
    assert screen.screen(x) == full_argmax(x, w)
    monkeypatch.setenv("QNEXT_KERNELS", "reference")  # the full head is then oneDNN's, whose order may differ
    assert screen.screen(x) is None


def test_build_gates() -> None:
    small = (torch.randn(1000, 64) * 0.05).bfloat16()
    assert GreedyScreen.build(small, lm_head_cpu.pack(small)) is None  # too narrow to pay
    assert GreedyScreen.build(small, None) is None  # no C head for it


def test_engine_greedy_tokens_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default (hidden 128) is below the width gate; with the gate lowered the screen serves its
    one-row steps, and a greedy request's tokens are those of the engine without it."""
    monkeypatch.setattr(greedy_screen, "MIN_WEIGHT_ELEMENTS", 0)
    ck = str(default_checkpoint())
    prompts = [[11, 22, 33, 44, 55], [7, 8, 9]]
    outs, calls = [], []
    for use in (True, False):
        engine = Engine(EngineConfig(model=ck, seed=0, cache_memory=64 << 20, max_num_seqs=4, dtype="bfloat16"))
        screen = engine.runner.greedy_screen
        assert screen is not None
        if use:
            real = screen.screen
            screen.screen = lambda x: calls.append((x.shape[0], real(x))) or calls[-1][1]
        else:
            engine.runner.greedy_screen = None
        outs.append([c.token_ids for p in prompts for c in engine.generate(
            [p], SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=12, ignore_eos=True))])
        engine.close()
    assert outs[0] == outs[1]
    # the screen decided those steps itself (None would have handed them to the full head)
    assert len(calls) >= 20 and all(rows == 1 and tokens is not None for rows, tokens in calls)


def test_the_draft_head_shares_its_int8_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """With MTP on, the int8 draft head reads the screen's packed weights: the head is not held twice."""
    monkeypatch.setattr(greedy_screen, "MIN_WEIGHT_ELEMENTS", 0)
    engine = Engine(EngineConfig(model=str(default_checkpoint()), seed=0, cache_memory=64 << 20, max_num_seqs=4,
                                 dtype="bfloat16", num_speculative_tokens=2))
    try:
        assert engine.spec.draft_head.packed is engine.runner.greedy_screen.int8
    finally:
        engine.close()
