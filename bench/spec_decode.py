"""MTP speculative decoding on the embedded tiny checkpoint: throughput, acceptance, and the verify step's cost.

A benchmark, not a test: it prints figures and always exits 0 (unless something crashes). Greedy decoding of
--new-tokens tokens (ignore_eos) for fixed random prompts, with one engine per draft length k
(EngineConfig(num_speculative_tokens=k)), on two checkpoints:

  random   the embedded default (worker.tiny.default_checkpoint(): random weights, the real 151,936 vocab).
           Its MTP head is as random as the rest, so its drafts are almost never the target's argmax: acceptance
           is ~0 and speculation cannot pay here. The run shows exactness (tokens == k=0) and the cost side.
  aligned  a temp copy of the default with the construction of tests/test_spec_decode.py's `aligned_ckpt`: every
           o_proj / out_proj / down_proj zeroed, every RMSNorm weight except linear_attn.norm zeroed (scale 1),
           mtp.fc.weight = [I | 0]. The target then predicts from the current token alone and the MTP predicts
           exactly the target's next prediction: every draft is accepted, the upper bound of speculation.

For each checkpoint and batch size: one short warm-up run per engine, then --repeats runs; in each run all the
engines generate at once, stepped round robin (k=0, 1, 2, ... then again), so a busy neighbour on a shared machine
slows every k alike. tokens/s = tokens / (the run's own step() time); medians over runs. Every engine step is timed (step() wall, the model forward
from engine.runner.timings, the MTP drafting passes and the accept/rollback work inside it), and the steady-state steps
(after prefill, every sequence decoding / verifying a full k drafts) give the cost that decides whether MTP pays:
verify-step time / plain decode-step time. Speculation wins only if the tokens emitted per verify step (the mean
acceptance length) exceed that ratio.

    python bench/spec_decode.py                          # k = 0..4, batch 1 and 8, 32 + 32 tokens, 1 repeat
    python bench/spec_decode.py --threads 1 --repeats 3 --out spec.json
    python bench/spec_decode.py --batch-sizes 8 --ks 0,2,4 --checkpoints aligned --new-tokens 64

On a shared machine use --threads 1 (see bench/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .
from bench.provenance import git_line, git_state  # noqa: E402

import torch  # noqa: E402

from bench.bench_common import random_prompts, write_json  # noqa: E402
from bench.spec_report import print_step_costs, print_throughput, print_verdicts  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.model_runner import StepTimings  # noqa: E402
from qnext.worker.types import (DRAFT_HEADS, EngineConfig, GenerationRequest, SamplingParams,  # noqa: E402
                                 StoppingParams)
from qnext.worker.spec_decode import SpecCounters  # noqa: E402
from qnext.worker.tiny import align_mtp_with_target, default_checkpoint  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


SEED_REQUESTS = False  # --seed-requests: sampled requests get seeds (then verified by coupled draws: k=0's tokens)
SAMPLES = 1  # --samples: parallel samples per request (GenerationRequest.n)


def sampling_of(args: argparse.Namespace) -> SamplingParams:
    """Greedy, or --temperature with --top-p / --top-k (each request then gets its own seed)."""
    if args.temperature == 0.0:
        return GREEDY
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)


def _pools_free(engine) -> bool:
    engine.reset_prefix_cache()  # cached prefixes hold blocks until cleared
    return engine.cache_manager.is_full() and engine.spec.num_tracked == 0


def make_aligned_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of src whose MTP head drafts exactly the target's prediction (worker.tiny.align_mtp_with_target)."""
    shutil.copytree(src, dst)
    align_mtp_with_target(dst)
    return dst


class StepProbe:
    """Times every engine step and its parts by wrapping the engine instance's own methods (no engine change):
    scheduler.schedule (to see the plan), spec.propose (the MTP drafting passes), spec.verify (acceptance and the
    DeltaNet rollback). The model forward comes from engine.runner.timings.forward_s."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.plan = None
        self.draft_s = 0.0
        self.verify_s = 0.0
        sync = engine.runner.device.type == "cuda"
        schedule = engine.scheduler.schedule

        def schedule_hook():
            self.plan = schedule()
            return self.plan

        def timed(fn, attr):
            def wrapper(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    if sync:
                        torch.cuda.synchronize(engine.runner.device)
                    setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)
            return wrapper

        engine.scheduler.schedule = schedule_hook
        engine.spec.propose = timed(engine.spec.propose, "draft_s")
        engine.spec.verify = timed(engine.spec.verify, "verify_s")

    def step(self):
        """engine.step() plus a record: (kind, drafts per chunk, wall, forward, drafting, verify) of the step."""
        e = self.engine
        self.plan = None
        fwd0, draft0, verify0 = e.runner.timings.forward_s, self.draft_s, self.verify_s
        start = time.perf_counter()
        outputs = e.step()
        wall = time.perf_counter() - start
        chunks = self.plan.chunks if self.plan is not None else []
        drafts = [len(c.draft_token_ids) for c in chunks]
        if chunks and all(d > 0 for d in drafts):
            kind = "verify"
        elif chunks and all(c.num_tokens == 1 and d == 0 for c, d in zip(chunks, drafts)):
            kind = "decode"
        else:
            kind = "other"  # prefill, or a mix
        return outputs, {"kind": kind, "num_chunks": len(chunks), "drafts": drafts, "wall_s": wall,
                         "forward_s": e.runner.timings.forward_s - fwd0, "draft_s": self.draft_s - draft0,
                         "verify_s": self.verify_s - verify0}


class Run:
    """One greedy generation of `prompts` on one engine, advanced a step at a time (so runs interleave)."""

    def __init__(self, probe: StepProbe, prompts: list[list[int]], new_tokens: int, tag: str,
                 sampling: SamplingParams = GREEDY) -> None:
        self.probe, self.new_tokens = probe, new_tokens
        engine = probe.engine
        engine.runner.timings = StepTimings()
        engine.spec.counters = SpecCounters()
        self.ids = [f"{tag}-{i}" for i in range(len(prompts))]
        self.keys = [(rid, i) for rid in self.ids for i in range(SAMPLES)]  # (request id, sample index)
        self.tokens: dict[tuple[str, int], list[int]] = {key: [] for key in self.keys}
        self.finals: dict[tuple[str, int], Any] = {}
        self.steps: list[dict[str, Any]] = []
        start = time.perf_counter()
        for i, (rid, p) in enumerate(zip(self.ids, prompts)):
            own = dataclasses.replace(sampling, seed=i) if sampling.temperature > 0.0 and SEED_REQUESTS else sampling
            engine.add_request(GenerationRequest(rid, p, own, StoppingParams(max_new_tokens=new_tokens,
                                                                               ignore_eos=True), n=SAMPLES))
        self.wall = time.perf_counter() - start  # this run's own time: add_request + its steps

    def active(self) -> bool:
        return self.probe.engine.has_unfinished()

    def step(self) -> None:
        outputs, rec = self.probe.step()
        self.wall += rec["wall_s"]
        self.steps.append(rec)
        for o in outputs:
            self.tokens[o.request_id, o.index] += o.new_token_ids
            if o.finished:
                self.finals[o.request_id, o.index] = o

    def result(self) -> dict[str, Any]:
        engine = self.probe.engine
        c = engine.spec.counters
        drafted_by_pos = [0] * max(engine.runner.max_spec_tokens, 1)
        for rec in self.steps:
            for d in rec["drafts"]:
                for j in range(d):
                    drafted_by_pos[j] += 1
        token_lists = [self.tokens[key] for key in self.keys]
        assert all(len(t) == self.new_tokens for t in token_lists), "wrong number of generated tokens"
        return {
            "wall_s": self.wall, "tokens": token_lists, "num_steps": engine.runner.timings.num_steps,
            "drafted": c.num_drafted, "accepted": c.num_accepted, "verify_steps": c.num_verify_steps,
            "accepted_by_pos": list(c.accepted_by_position[:len(drafted_by_pos)]), "drafted_by_pos": drafted_by_pos,
            # the per-request counters of the final RequestOutputs must add up to the engine-wide ones
            "request_counters_agree": (sum(o.num_drafted_tokens for o in self.finals.values()) == c.num_drafted
                                       and sum(o.num_accepted_tokens for o in self.finals.values()) == c.num_accepted),
            "pools_free": _pools_free(engine),
            "steps": self.steps,
        }


def run_interleaved(probes: dict[int, StepProbe], prompts: list[list[int]], new_tokens: int,
                    tag: str, sampling: SamplingParams = GREEDY) -> dict[int, dict[str, Any]]:
    """The same generation on every engine at once, stepping them round robin: a busy neighbour on a shared
    machine slows every k alike instead of whichever run it happened to overlap."""
    runs = {k: Run(probe, prompts, new_tokens, f"{tag}-k{k}", sampling) for k, probe in probes.items()}
    while True:
        active = [r for r in runs.values() if r.active()]
        if not active:
            break
        for r in active:
            r.step()
    return {k: r.result() for k, r in runs.items()}


def steady_steps(steps: list[dict[str, Any]], batch: int, k: int) -> list[dict[str, Any]]:
    """Steps after prefill with every sequence decoding (k = 0) or verifying exactly k drafts."""
    want = "decode" if k == 0 else "verify"
    return [s for s in steps if s["kind"] == want and s["num_chunks"] == batch and all(d == k for d in s["drafts"])]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def break_even_alpha(length: float, k: int) -> float | None:
    """Per-draft acceptance rate a with (1 - a^(k+1)) / (1 - a) = length (i.i.d. acceptance); None if > k+1."""
    if length <= 1.0:
        return 0.0
    if length > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if sum(a ** j for j in range(k + 1)) < length:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def bench_checkpoint(name: str, model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    engines = {}
    for k in args.ks:
        engines[k] = StepProbe(Engine(EngineConfig(model=str(model_dir), device=args.device, seed=0,
                                                   cache_memory=args.cache_memory, num_speculative_tokens=k,
                                                   speculative_draft_length=args.draft_length,
                                                   speculative_draft_head=args.draft_head,
                                                   max_num_seqs=max(64, max(args.batch_sizes)))))
    results = []
    for b in args.batch_sizes:
        prompts = random_prompts(b, args.prompt_len, args.seed + b)
        # warm-up: a short run through prefill, drafting and verify on every engine
        run_interleaved(engines, prompts, min(args.new_tokens, args.warmup_tokens), "warm", sampling_of(args))
        runs: dict[int, list[dict[str, Any]]] = {k: [] for k in args.ks}
        t0 = time.perf_counter()
        for rep in range(args.repeats):
            for k, r in run_interleaved(engines, prompts, args.new_tokens, f"r{rep}", sampling_of(args)).items():
                runs[k].append(r)
        reference = runs[args.ks[0]][0]["tokens"]  # k = ks[0] (0 by default)
        for k in args.ks:
            rs = runs[k]
            steady = [s for r in rs for s in steady_steps(r["steps"], b * SAMPLES, k)]
            acc_pos = [sum(r["accepted_by_pos"][j] for r in rs) for j in range(len(rs[0]["drafted_by_pos"]))]
            dr_pos = [sum(r["drafted_by_pos"][j] for r in rs) for j in range(len(rs[0]["drafted_by_pos"]))]
            drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
            vsteps = sum(r["verify_steps"] for r in rs)
            mismatched = sorted({i for r in rs for i, (a, t) in enumerate(zip(r["tokens"], reference)) if a != t})
            results.append({
                "checkpoint": name, "batch": b, "samples": SAMPLES, "k": k,
                "generated_tokens": b * SAMPLES * args.new_tokens, "wall_s": [r["wall_s"] for r in rs],
                "tok_s": b * SAMPLES * args.new_tokens / med([r["wall_s"] for r in rs]),
                "steps_per_run": med([r["num_steps"] for r in rs]),
                "drafted_per_run": drafted / len(rs), "accepted_per_run": accepted / len(rs),
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_acceptance_length": (accepted + vsteps) / vsteps if vsteps else None,
                "acceptance_by_position": [a / d if d else None for a, d in zip(acc_pos, dr_pos)][:k],
                "greedy_equal_k0": not mismatched, "mismatched_sequences": mismatched,
                "sampled": args.temperature > 0.0, "seeded": args.temperature > 0.0 and args.seed_requests,
                "request_counters_agree": all(r["request_counters_agree"] for r in rs),
                "pools_free": all(r["pools_free"] for r in rs),
                "steady_steps": len(steady),
                "step_ms": 1e3 * med([s["wall_s"] for s in steady]),
                "forward_ms": 1e3 * med([s["forward_s"] for s in steady]),
                "draft_ms": 1e3 * med([s["draft_s"] for s in steady]),
                "verify_ms": 1e3 * med([s["verify_s"] for s in steady]),
            })
        print(f"  {name} batch {b}: done ({time.perf_counter() - t0:.1f} s measured)", flush=True)
    for r in results:  # ratios against the same checkpoint and batch at k = 0
        base = next((x for x in results if x["batch"] == r["batch"] and x["k"] == 0), None)
        r["speedup_vs_k0"] = r["tok_s"] / base["tok_s"] if base else None
        r["step_ratio"] = r["step_ms"] / base["step_ms"] if base else None
        r["forward_ratio"] = r["forward_ms"] / base["forward_ms"] if base else None
        r["break_even_length"] = r["step_ratio"] if r["k"] and base else None
        r["break_even_alpha"] = break_even_alpha(r["step_ratio"], r["k"]) if r["k"] and base else None
    del engines
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="0,1,2,3,4", help="draft lengths, comma-separated; must start with 0 "
                   "(default 0,1,2,3,4)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence (default 32)")
    p.add_argument("--repeats", type=int, default=1, help="measured runs per k and batch size, interleaved "
                   "(default 1; each run of a batch-8 k=4 random-weight engine takes ~30 s on 2 cores)")
    p.add_argument("--warmup-tokens", type=int, default=6, help="new tokens of each engine's warm-up run (default 6)")
    p.add_argument("--draft-head", default="auto", choices=DRAFT_HEADS,
                   help="EngineConfig.speculative_draft_head: auto (int8 LM head for one-row draft passes on a CPU "
                        "in bf16, worker/draft_head.py) or full (default auto)")
    p.add_argument("--draft-length", default="fixed", choices=("fixed", "adaptive"),
                   help="fixed: every step drafts k (the verify step's cost); adaptive: the engine's default policy "
                        "chooses 0..k per step (worker/spec_policy.py; give it --warmup-tokens to time each k)")
    p.add_argument("--checkpoints", default="random,aligned", help="random, aligned or both (default both)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="engine device (default cpu)")
    p.add_argument("--cache-memory", type=float, default=256 << 20, help="EngineConfig.cache_memory (default 256 MiB)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples (with --top-p / --top-k): unseeded requests' tokens differ "
                        "from k=0's by design (the same distribution), acceptance follows p/q")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed-requests", action="store_true",
                   help="seed each sampled request: verified by coupled draws, its tokens are k=0's "
                        "(docs/speculation.md)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--samples", type=int, default=1,
                   help="parallel samples per request (GenerationRequest.n, default 1): each batch entry is one "
                        "request of this many samples; a seed per request (--seed-requests) seeds sample i with +i")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.names = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    if not args.ks or args.ks[0] != 0 or any(not 0 <= k <= 4 for k in args.ks):
        p.error("--ks must start with 0 and hold values in [0, 4]")
    if args.repeats < 1 or args.new_tokens < 2 or args.prompt_len < 1 or not args.batch_sizes or args.samples < 1:
        p.error("--repeats, --prompt-len, --samples must be >= 1, --new-tokens >= 2, --batch-sizes non-empty")
    if not args.names or set(args.names) - {"random", "aligned"}:
        p.error("--checkpoints: random, aligned or both")
    return args


def print_header(args: argparse.Namespace, meta: dict[str, Any], src: Path) -> None:
    print(f"model {src}  |  torch {meta['torch']}, device {args.device}, threads {meta['threads']} "
          f"(cpus {meta['cpu_count']})  |  {git_line(meta['git'])}")
    print(f"k = {','.join(map(str, args.ks))}, batch {','.join(map(str, args.batch_sizes))}"
          f"{f' requests x {args.samples} samples' if args.samples > 1 else ''}, prompts "
          f"{args.prompt_len} random ids, {args.new_tokens} new tokens "
          f"{'greedy' if args.temperature == 0.0 else f'sampled ({sampling_of(args)})'} (ignore_eos); 1 warm-up + "
          f"{args.repeats} run(s) per engine, the engines stepped round robin")
    print("NOTE: the default checkpoint has RANDOM weights, MTP head included: its drafts almost never match the\n"
          "target's argmax, so acceptance is ~0 and speculation cannot pay on it (each verify step emits 1 token at\n"
          "a higher cost). The 'aligned' checkpoint (drafts always accepted) shows the upper bound.")


def main(argv: list[str] | None = None) -> int:
    global SEED_REQUESTS, SAMPLES
    args = parse_args(argv)
    SEED_REQUESTS, SAMPLES = args.seed_requests, args.samples
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "device": args.device, "ks": args.ks, "batch_sizes": args.batch_sizes,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed,
        "draft_length": args.draft_length, "draft_head": args.draft_head, "samples": args.samples, "git": git_state(),
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                     "seeded": args.seed_requests},
    }
    src = default_checkpoint()
    print_header(args, meta, src)
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="qnext-spec-bench."))
    try:
        for name in args.names:
            model_dir = src if name == "random" else make_aligned_checkpoint(src, tmp / "aligned")
            results += bench_checkpoint(name, model_dir, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in args.names:
        print_throughput([r for r in results if r["checkpoint"] == name], name, args.repeats)
    print_step_costs(results)
    print_verdicts(results)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_json(Path(args.out), {"meta": meta, "results": results}, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
