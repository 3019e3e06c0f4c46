"""The whole engine at Qwen3-Next-80B-A3B's real shape on one GPU, without a checkpoint: one JSON of figures.

The model is built directly on the device with the real dimensions and depth (48 layers: 36 Gated DeltaNet + 12
gated attention, each with a 512-expert top-10 MoE; the MTP layer; the 151,936-token vocabulary) and random FP8
block-128 weights where the real FP8 checkpoint has FP8 (bench/random_model.py; ~76 GB on the device). Then
`worker.engine.Engine` runs it end to end (scheduler, cache, CUDA graphs, sampler, MTP), as the server's worker
does, on random prompts with greedy sampling and ignore_eos. Sections, in priority order (each one is skipped
when the time budget is spent, and a failure in one is recorded and does not stop the others):

  graphs   engine k=0, CUDA graphs on: batch-1 decode at 1K and 32K context, prefill of an 8K prompt, 64
           concurrent sequences (1K prompts), and batch-1 decode with the MTP-aligned weights (the k=0 baseline
           of the MTP rows)
  mtp2     engine k=2: batch-1 decode with random weights (MTP drafts almost never accepted: the lower bound)
           and with aligned weights (every draft accepted: the upper bound) at batch 1 and 64
  eager    engine k=0 with --enforce-eager: batch-1 and 64-sequence decode (the graphs' speed-up), and a
           torch.profiler trace of a few decode steps at each, aggregated by kernel (where the time goes)
  mtp1     engine k=1, aligned, batch 1
  mtp3     engine k=3, aligned, batch 1

Every row runs once on the same shapes first (a warm-up, unmeasured: Triton compiles each new specialisation on
first use), except the 32K one. Figures per run: decode tokens/s over the steps where every sequence decodes
(median and slowest step ms too), prefill
tokens/s (prompt tokens / time to first token), MTP acceptance and tokens per step, and the memory each engine
took (weights, KV + state cache, graph pool, peak). A roofline per decode row: the bytes a step must move at least
(weights the step reads once, counting only the experts its tokens touch; the DeltaNet states read and written;
the KV read) over the device's copy bandwidth measured here.

    python bench/full_shape.py --out $OUT/full_shape.json           # one H200: ~3-5 min (compilation included)
    python bench/full_shape.py --sections graphs,eager --budget-s 120
    python bench/full_shape.py --device cpu --small                 # plumbing check on CPU (tiny dims), ~1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from bench.random_model import REAL_LAYERS, REAL_VOCAB, MtpAlignment, build_random_model, random_config  # noqa: E402

SECTIONS = ("graphs", "mtp2", "eager", "mtp1", "mtp3")


class Sizes:
    """Prompt and output lengths of the rows; `--small` shrinks them for the CPU plumbing check."""

    def __init__(self, small: bool) -> None:
        self.short_ctx = 64 if small else 1024  # the "1K context" rows
        self.long_ctx = 256 if small else 32768
        self.prefill = 128 if small else 8192
        self.concurrency = 4 if small else 64
        self.new_tokens = 8 if small else 64
        self.new_tokens_long = 4 if small else 32
        self.batched_tokens = 128 if small else 8192  # max_num_batched_tokens: one 8K prefill is one step
        self.profile_steps = 2 if small else 4


class Report:
    """The JSON result, rewritten after every row, and the time budget."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.deadline = path, time.monotonic() + budget_s if budget_s > 0 else float("inf")
        self.data: dict = {"rows": [], "errors": [], "skipped": [], "engines": []}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def error(self, where: str) -> None:
        tb = traceback.format_exc()
        print(f"!! {where} FAILED:\n{tb}", file=sys.stderr, flush=True)
        self.data["errors"].append({"where": where, "traceback": tb[-4000:]})
        self.write()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float) -> float:
    return round(n / 2 ** 30, 3)


# ---- the roofline ------------------------------------------------------------------------------------------------

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


# ---- running the engine ------------------------------------------------------------------------------------------

def make_engine(model, args, sizes: Sizes, k: int, graphs: str):
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig
    cfg = EngineConfig(device=args.device, max_num_seqs=max(sizes.concurrency, 1),
                       max_num_batched_tokens=sizes.batched_tokens, num_speculative_tokens=k, cuda_graphs=graphs,
                       cuda_graph_max_batch_size=sizes.concurrency, seed=0,
                       cache_memory=0.0 if args.device == "cuda" else float(2 << 30))
    return Engine(cfg, model=model)


def free_engine(engine, device: torch.device) -> None:
    """Drop an engine's cache and graphs before the next one sizes its cache from free memory."""
    engine.runner.graphs = engine.runner.mtp_graphs = engine.runner.cache = None
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 150000), (n, length), generator=g).tolist()  # below the special ids


def run(engine, ps: list[list[int]], new_tokens: int, tag: str, profile_steps: int = 0) -> dict:
    """Run `ps` to completion (greedy, ignore_eos) and measure. Decode figures come from the steps after every
    sequence has its first token in which every sequence emitted (a full batch); prefill = prompt tokens over
    the time to the last first token. With `profile_steps`, that many full-batch decode steps run under
    torch.profiler and the kernels' device time is aggregated by name."""
    from qnext.worker.types import GenerationRequest
    from qnext.worker.types import SamplingParams
    from qnext.worker.types import StoppingParams
    engine.reset_prefix_cache()
    spec0 = (engine.spec.counters.num_drafted, engine.spec.counters.num_accepted, engine.spec.counters.num_verify_steps)
    graph0 = (engine.runner.graphs.stats.replayed_steps, engine.runner.graphs.stats.eager_steps) if engine.runner.graphs else (0, 0)
    ids = [f"{tag}-{i}" for i in range(len(ps))]
    start = time.perf_counter()
    for rid, p in zip(ids, ps):
        engine.add_request(GenerationRequest(rid, p, SamplingParams(temperature=0.0),
                                             StoppingParams(max_new_tokens=new_tokens, ignore_eos=True)))
    got = {rid: 0 for rid in ids}
    first_token_s: dict[str, float] = {}
    decode_steps: list[tuple[float, int]] = []  # (seconds, tokens) of full-batch decode steps
    steps = 0
    profile: dict | None = None
    while engine.has_unfinished():
        all_started = len(first_token_s) == len(ids)
        prof = None
        if all_started and profile_steps and profile is None and len(decode_steps) >= 2:
            prof = profiled_steps(engine, profile_steps)
            profile = prof["summary"]
            for rid, n in prof["tokens"].items():
                got[rid] += n
            continue
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        steps += 1
        emitted = 0
        for o in outs:
            if o.new_token_ids and o.request_id not in first_token_s:
                first_token_s[o.request_id] = time.perf_counter() - start
            got[o.request_id] += len(o.new_token_ids)
            emitted += bool(o.new_token_ids)
        if all_started and emitted == len(ids):
            decode_steps.append((dt, sum(len(o.new_token_ids) for o in outs)))
    total_s = time.perf_counter() - start
    assert all(n == new_tokens for n in got.values()), f"{tag}: tokens per request {sorted(set(got.values()))}"
    row: dict = dict(sequences=len(ps), prompt_tokens=len(ps[0]), new_tokens=new_tokens, steps=steps,
                     total_s=round(total_s, 4))
    ttft = max(first_token_s.values())
    row["prefill_s"] = round(ttft, 4)
    row["prefill_tok_s"] = round(sum(len(p) for p in ps) / ttft, 1)
    if decode_steps:
        secs = sum(s for s, _ in decode_steps)
        toks = sum(n for _, n in decode_steps)
        row.update(decode_steps=len(decode_steps), decode_tok_s=round(toks / secs, 1),
                   decode_tok_s_per_seq=round(toks / secs / len(ps), 2),
                   step_ms_median=round(1e3 * statistics.median(s for s, _ in decode_steps), 3),
                   step_ms_max=round(1e3 * max(s for s, _ in decode_steps), 3),
                   tokens_per_step=round(toks / len(decode_steps) / len(ps), 3))
    c = engine.spec.counters
    drafted, accepted, verifies = (c.num_drafted - spec0[0], c.num_accepted - spec0[1],
                                   c.num_verify_steps - spec0[2])
    if drafted:
        row.update(drafted=drafted, accepted=accepted, acceptance=round(accepted / drafted, 4),
                   mean_acceptance_length=round((accepted + verifies) / verifies, 3))
    if engine.runner.graphs is not None:
        row.update(graph_steps=engine.runner.graphs.stats.replayed_steps - graph0[0],
                   eager_steps_in_graph_mode=engine.runner.graphs.stats.eager_steps - graph0[1])
    if profile is not None:
        row["profile"] = profile
    return row


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


# ---- the sections ------------------------------------------------------------------------------------------------

def engine_info(engine, device: torch.device, built_s: float, before: int) -> dict:
    ci = engine.cache_info
    info = dict(k=engine.runner.max_spec_tokens, graphs=engine.runner.describe_graphs(), build_s=round(built_s, 2),
                cache_gib=gib(ci.num_blocks * ci.bytes_per_block + ci.num_slots * ci.bytes_per_slot +
                              ci.num_checkpoints * ci.bytes_per_checkpoint),
                kv_tokens=ci.num_kv_tokens, state_slots=ci.num_slots, checkpoints=ci.num_checkpoints)
    if device.type == "cuda":
        info["allocated_gib"] = gib(torch.cuda.memory_allocated(device))
        info["engine_gib"] = gib(torch.cuda.memory_allocated(device) - before)
    return info


def section(name: str, model, args, sizes: Sizes, rep: Report, mtp: MtpAlignment | None, wb: dict) -> None:
    device = torch.device(args.device)
    vocab = model.config.vocab_size
    k = {"graphs": 0, "eager": 0, "mtp1": 1, "mtp2": 2, "mtp3": 3}[name]
    if k and model.config.num_mtp_layers == 0:
        rep.data["skipped"].append(f"{name}: the model has no MTP head")
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    graphs = "off" if name == "eager" else ("auto" if device.type == "cuda" else "padded-eager")
    engine = make_engine(model, args, sizes, k, graphs)
    sync(device)
    info = engine_info(engine, device, time.perf_counter() - t0, before)
    info["section"] = name
    rep.data["engines"].append(info)
    rep.write()
    print(f"[{name}] engine k={k}: {info}", flush=True)
    seed = 100 * SECTIONS.index(name)

    def measure(label: str, n: int, ctx: int, new: int, aligned: bool = False, profile_steps: int = 0,
                warmup: bool = True) -> None:
        if rep.left_s() < 5:
            rep.data["skipped"].append(f"{name}/{label}: time budget spent")
            return
        try:
            if aligned:
                mtp.align()
            try:
                if warmup:  # the same shapes first: Triton compiles each new specialisation on first use
                    run(engine, prompts(n, ctx, vocab, seed + 999), min(new, 8), f"{name}-{label}-warmup")
                row = run(engine, prompts(n, ctx, vocab, seed + len(rep.data["rows"])), new, f"{name}-{label}",
                          profile_steps)
            finally:
                if aligned:
                    mtp.restore()
        except Exception:
            rep.error(f"{name}/{label}")
            return
        row.update(section=name, label=label, k=k, graphs=engine.runner.graphs is not None, aligned=aligned)
        if "decode_tok_s" in row and rep.data.get("copy_gbps"):
            floor = decode_floor_bytes(model, engine.runner.cache, wb, n, ctx + new // 2)
            floor_ms = floor["total"] / (rep.data["copy_gbps"] * 1e9) * 1e3
            row["roofline"] = dict(bytes=floor, floor_ms_per_step=round(floor_ms, 4),
                                   floor_tok_s=round(n / floor_ms * 1e3, 1),
                                   pct_of_roofline=round(100 * floor_ms * row["tokens_per_step"] /
                                                         row["step_ms_median"], 2))
        rep.data["rows"].append(row)
        rep.write()
        brief = {x: row.get(x) for x in ("decode_tok_s", "step_ms_median", "prefill_tok_s", "acceptance",
                                         "tokens_per_step")}
        print(f"[{name}] {label}: {brief}", flush=True)

    try:
        if name == "graphs":
            measure("b1_ctx1k", 1, sizes.short_ctx, sizes.new_tokens, profile_steps=sizes.profile_steps)
            measure("prefill_8k", 1, sizes.prefill, 1)
            measure(f"conc{sizes.concurrency}_ctx1k", sizes.concurrency, sizes.short_ctx, sizes.new_tokens_long,
                    profile_steps=sizes.profile_steps)
            measure("b1_ctx32k", 1, sizes.long_ctx, sizes.new_tokens_long, warmup=False)  # a 32K warm-up: seconds
            if mtp is not None:
                measure("b1_ctx1k_aligned", 1, sizes.short_ctx, sizes.new_tokens, aligned=True)
        elif name == "eager":
            measure("b1_ctx1k", 1, sizes.short_ctx, sizes.new_tokens, profile_steps=sizes.profile_steps)
            measure(f"conc{sizes.concurrency}_ctx1k", sizes.concurrency, sizes.short_ctx, sizes.new_tokens_long,
                    profile_steps=sizes.profile_steps)
        elif name == "mtp2":
            measure("b1_ctx1k_random", 1, sizes.short_ctx, sizes.new_tokens)
            measure("b1_ctx1k_aligned", 1, sizes.short_ctx, sizes.new_tokens, aligned=True)
            measure(f"conc{sizes.concurrency}_ctx1k_aligned", sizes.concurrency, sizes.short_ctx,
                    sizes.new_tokens_long, aligned=True, profile_steps=sizes.profile_steps)
        else:
            measure("b1_ctx1k_aligned", 1, sizes.short_ctx, sizes.new_tokens, aligned=True)
    finally:
        if device.type == "cuda":
            info["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
        free_engine(engine, device)
        rep.write()


def summarise(rep: Report) -> None:
    """The headline table: one line per row, and the ratios the issue asks for (same run)."""
    rows = rep.data["rows"]
    by = {(r["section"], r["label"]): r for r in rows}
    print(f"\n{'section':<8} {'row':<24} {'decode tok/s':>12} {'step ms':>8} {'tok/step':>8} {'prefill tok/s':>13} "
          f"{'accept':>6} {'% roofline':>10}")
    for r in rows:
        print(f"{r['section']:<8} {r['label']:<24} {r.get('decode_tok_s', float('nan')):>12.1f} "
              f"{r.get('step_ms_median', float('nan')):>8.2f} {r.get('tokens_per_step', float('nan')):>8.2f} "
              f"{r.get('prefill_tok_s', float('nan')):>13.0f} {r.get('acceptance', float('nan')):>6.2f} "
              f"{r.get('roofline', {}).get('pct_of_roofline', float('nan')):>10.1f}")
    ratios = {}
    conc = next((lbl for s, lbl in by if s == "graphs" and lbl.startswith("conc")), None)
    for lbl in ("b1_ctx1k", conc):
        g, e = by.get(("graphs", lbl)), by.get(("eager", lbl))
        if lbl and g and e and "decode_tok_s" in g and "decode_tok_s" in e:
            ratios[f"graphs_speedup_{lbl}"] = round(g["decode_tok_s"] / e["decode_tok_s"], 3)
    base = by.get(("graphs", "b1_ctx1k_aligned"))
    for s in ("mtp1", "mtp2", "mtp3"):
        r = by.get((s, "b1_ctx1k_aligned"))
        if base and r and "decode_tok_s" in r:
            ratios[f"{s}_aligned_speedup_b1"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
    r, b = by.get(("mtp2", "b1_ctx1k_random")), by.get(("graphs", "b1_ctx1k"))
    if r and b and "decode_tok_s" in r:
        ratios["mtp2_random_speedup_b1"] = round(r["decode_tok_s"] / b["decode_tok_s"], 3)
    r, b = by.get(("mtp2", f"{conc}_aligned")), by.get(("graphs", conc))
    if r and b and "decode_tok_s" in r:
        ratios[f"mtp2_aligned_speedup_{conc}"] = round(r["decode_tok_s"] / b["decode_tok_s"], 3)
    rep.data["ratios"] = ratios
    print("ratios (same run):", json.dumps(ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny dimensions, 4 layers, short prompts (CPU check)")
    p.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {REAL_LAYERS}; 4 with --small)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights instead of FP8 block-128")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this many seconds (0: none)")
    p.add_argument("--out", type=Path, default=None, help="JSON; default $OUT/full_shape.json or ./full_shape.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: use --device cpu --small for the plumbing check")
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(names) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(names) - set(SECTIONS))}")
    out = args.out or (Path(os.environ["OUT"]) / "full_shape.json" if os.environ.get("OUT") else
                       Path("full_shape.json"))
    rep = Report(out, args.budget_s)
    sizes = Sizes(args.small)
    layers = args.layers or (4 if args.small else REAL_LAYERS)
    vocab = 4096 if args.small else REAL_VOCAB
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rep.data.update(args={k: str(v) for k, v in vars(args).items()}, torch=torch.__version__, host=platform.node(),
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    sizes=vars(sizes))
    try:
        import triton
        rep.data["triton"] = triton.__version__
    except ImportError:
        pass
    torch.manual_seed(0)
    raw, cfg = random_config(layers, vocab, fp8=not args.bf16, mtp=True, small=args.small)
    rep.data["copy_gbps"] = round(copy_gbps(device), 1) if device.type == "cuda" else None
    t0 = time.perf_counter()
    model = build_random_model(cfg, device, dtype)
    sync(device)
    wb = weight_bytes(model)
    rep.data["model"] = dict(layers=layers, attention_layers=len(cfg.full_attention_layers), vocab=vocab,
                             mtp_layers=cfg.num_mtp_layers, fp8=cfg.quant is not None, dtype=str(dtype),
                             build_s=round(time.perf_counter() - t0, 2),
                             weights_gb={k: round(v / 1e9, 3) for k, v in wb.items()})
    if device.type == "cuda":
        rep.data["model"]["allocated_gib_after_build"] = gib(torch.cuda.memory_allocated(device))
        free, total = torch.cuda.mem_get_info(device)
        rep.data["model"]["free_gib_after_build"], rep.data["model"]["device_gib"] = gib(free), gib(total)
    rep.write()
    print(f"{rep.data['device']} torch {torch.__version__}: model {rep.data['model']}", flush=True)
    mtp = MtpAlignment(model) if cfg.num_mtp_layers else None
    with torch.inference_mode():
        for name in names:
            if rep.left_s() < 20:
                rep.data["skipped"].append(f"{name}: time budget spent")
                continue
            try:
                section(name, model, args, sizes, rep, mtp, wb)
            except Exception:
                rep.error(name)
    if device.type == "cuda":
        rep.data["max_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
    summarise(rep)
    rep.write()
    print(f"wrote {out}; {len(rep.data['errors'])} error(s), skipped: {rep.data['skipped']}")
    sys.exit(1 if rep.data["errors"] else 0)


if __name__ == "__main__":
    main()
