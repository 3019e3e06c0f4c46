"""Driving an `Engine` through greedy requests (ignore_eos) to completion and measuring it: prefill and decode
rates, step times, MTP acceptance, CUDA-graph use, and optionally a torch.profiler summary of a few decode steps
by kernel."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch


def free_engine(engine, device: torch.device) -> None:
    """Drop an engine's cache and graphs before the next one sizes its cache from free memory."""
    engine.runner.graphs = engine.runner.mtp_graphs = engine.runner.cache = None
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _counters(engine) -> tuple[int, int, int, int, int]:
    """The engine's cumulative MTP and graph counters, to take differences over one run."""
    c, g = engine.spec.counters, engine.runner.graphs
    return (c.num_drafted, c.num_accepted, c.num_verify_steps, g.stats.replayed_steps if g else 0,
            g.stats.eager_steps if g else 0)


@dataclass
class Tally:
    """What a run collects step by step."""
    got: dict[str, int]  # tokens per request
    first_token_s: dict[str, float] = field(default_factory=dict)  # since the run's start
    decode_steps: list[tuple[float, int]] = field(default_factory=list)  # (seconds, tokens) of full-batch decodes
    steps: int = 0
    profile: dict | None = None


def run(engine, ps: list[list[int]], new_tokens: int, tag: str, profile_steps: int = 0) -> dict:
    """Run `ps` to completion (greedy, ignore_eos) and measure. Decode figures come from the steps after every
    sequence has its first token in which every sequence emitted (a full batch); prefill = prompt tokens over
    the time to the last first token. With `profile_steps`, that many full-batch decode steps run under
    torch.profiler and the kernels' device time is aggregated by name."""
    from qnext.worker.types import GenerationRequest, SamplingParams, StoppingParams
    engine.reset_prefix_cache()
    before = _counters(engine)
    ids = [f"{tag}-{i}" for i in range(len(ps))]
    start = time.perf_counter()
    for rid, p in zip(ids, ps):
        engine.add_request(GenerationRequest(rid, p, SamplingParams(temperature=0.0),
                                             StoppingParams(max_new_tokens=new_tokens, ignore_eos=True)))
    t = _drive(engine, ids, start, profile_steps)
    total_s = time.perf_counter() - start
    assert all(n == new_tokens for n in t.got.values()), f"{tag}: tokens per request {sorted(set(t.got.values()))}"
    row: dict = dict(sequences=len(ps), prompt_tokens=len(ps[0]), new_tokens=new_tokens, steps=t.steps,
                     total_s=round(total_s, 4))
    ttft = max(t.first_token_s.values())
    row["prefill_s"] = round(ttft, 4)
    row["prefill_tok_s"] = round(sum(len(p) for p in ps) / ttft, 1)
    row.update(_decode_figures(t.decode_steps, len(ps)))
    row.update(_counter_figures(engine, before))
    if t.profile is not None:
        row["profile"] = t.profile
    return row


def _drive(engine, ids: list[str], start: float, profile_steps: int) -> Tally:
    t = Tally({rid: 0 for rid in ids})
    while engine.has_unfinished():
        all_started = len(t.first_token_s) == len(ids)
        if all_started and profile_steps and t.profile is None and len(t.decode_steps) >= 2:
            prof = profiled_steps(engine, profile_steps)
            t.profile = prof["summary"]
            for rid, n in prof["tokens"].items():
                t.got[rid] += n
            continue
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        t.steps += 1
        emitted = 0
        for o in outs:
            if o.new_token_ids and o.request_id not in t.first_token_s:
                t.first_token_s[o.request_id] = time.perf_counter() - start
            t.got[o.request_id] += len(o.new_token_ids)
            emitted += bool(o.new_token_ids)
        if all_started and emitted == len(ids):
            t.decode_steps.append((dt, sum(len(o.new_token_ids) for o in outs)))
    return t


def _decode_figures(decode_steps: list[tuple[float, int]], n_seqs: int) -> dict:
    if not decode_steps:
        return {}
    secs = sum(s for s, _ in decode_steps)
    toks = sum(n for _, n in decode_steps)
    return dict(decode_steps=len(decode_steps), decode_tok_s=round(toks / secs, 1),
                decode_tok_s_per_seq=round(toks / secs / n_seqs, 2),
                step_ms_median=round(1e3 * statistics.median(s for s, _ in decode_steps), 3),
                step_ms_max=round(1e3 * max(s for s, _ in decode_steps), 3),
                tokens_per_step=round(toks / len(decode_steps) / n_seqs, 3))


def _counter_figures(engine, before: tuple[int, ...]) -> dict:
    drafted, accepted, verifies, replayed, eager = (a - b for a, b in zip(_counters(engine), before))
    out: dict = {}
    if drafted:
        out.update(drafted=drafted, accepted=accepted, acceptance=round(accepted / drafted, 4),
                   mean_acceptance_length=round((accepted + verifies) / verifies, 3))
    if engine.runner.graphs is not None:
        out.update(graph_steps=replayed, eager_steps_in_graph_mode=eager)
    return out


def profiled_steps(engine, n: int) -> dict:
    """`n` engine steps under torch.profiler; kernel device time aggregated by name (per step) from its trace."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.runner.device.type == "cuda" else [])
    tokens: dict[str, int] = defaultdict(int)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            for o in engine.step():
                tokens[o.request_id] += len(o.new_token_ids)
        wall = time.perf_counter() - t0
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qnext_trace_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            k = kernels[e["name"][:120]]
            k[0] += 1
            k[1] += e["dur"]
    device_us = sum(v[1] for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    summary = dict(steps=n, wall_ms_per_step=round(1e3 * wall / n, 3),
                   kernel_ms_per_step=round(device_us / 1e3 / n, 3), kernels_per_step=sum(v[0] for v in
                                                                                          kernels.values()) / n,
                   top=[dict(name=name, calls_per_step=c / n, us_per_step=round(us / n, 2),
                             pct=round(100 * us / device_us, 2) if device_us else 0.0)
                        for name, (c, us) in top[:40]])
    return dict(summary=summary, tokens=tokens)
