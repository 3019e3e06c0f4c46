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
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from bench.bench_common import default_out, random_prompts, sync, write_json  # noqa: E402
from bench.engine_run import free_engine, run  # noqa: E402
from bench.random_model import REAL_LAYERS, REAL_VOCAB, MtpAlignment, build_random_model, random_config  # noqa: E402
from bench.roofline import copy_gbps, roofline, weight_bytes  # noqa: E402

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
        write_json(self.path, self.data)

    def error(self, where: str) -> None:
        tb = traceback.format_exc()
        print(f"!! {where} FAILED:\n{tb}", file=sys.stderr, flush=True)
        self.data["errors"].append({"where": where, "traceback": tb[-4000:]})
        self.write()


def gib(n: float) -> float:
    return round(n / 2 ** 30, 3)


# ---- the sections ------------------------------------------------------------------------------------------------

def make_engine(model, args, sizes: Sizes, k: int, graphs: str):
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig
    cfg = EngineConfig(device=args.device, max_num_seqs=max(sizes.concurrency, 1),
                       max_num_batched_tokens=sizes.batched_tokens, num_speculative_tokens=k, cuda_graphs=graphs,
                       cuda_graph_max_batch_size=sizes.concurrency, seed=0,
                       cache_memory=0.0 if args.device == "cuda" else float(2 << 30))
    return Engine(cfg, model=model)


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


def start_engine(name: str, model, args, sizes: Sizes, k: int, rep: Report) -> tuple[object, dict]:
    """The section's engine, its cache and graphs built; what it took is recorded in the report."""
    device = torch.device(args.device)
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
    return engine, info


def section_rows(name: str, sizes: Sizes, has_mtp: bool) -> list[tuple[str, dict]]:
    """The rows of a section, in order: (label, measure_row's arguments)."""
    b1 = dict(n=1, ctx=sizes.short_ctx, new=sizes.new_tokens)
    conc = dict(n=sizes.concurrency, ctx=sizes.short_ctx, new=sizes.new_tokens_long)
    prof, aligned = dict(profile_steps=sizes.profile_steps), dict(aligned=True)
    conc_label = f"conc{sizes.concurrency}_ctx1k"
    if name == "graphs":
        long = dict(n=1, ctx=sizes.long_ctx, new=sizes.new_tokens_long, warmup=False)  # a 32K warm-up: seconds
        rows = [("b1_ctx1k", b1 | prof), ("prefill_8k", dict(n=1, ctx=sizes.prefill, new=1)),
                (conc_label, conc | prof), ("b1_ctx32k", long)]
        return rows + ([("b1_ctx1k_aligned", b1 | aligned)] if has_mtp else [])
    if name == "eager":
        return [("b1_ctx1k", b1 | prof), (conc_label, conc | prof)]
    if name == "mtp2":
        return [("b1_ctx1k_random", b1), ("b1_ctx1k_aligned", b1 | aligned),
                (f"{conc_label}_aligned", conc | aligned | prof)]
    return [("b1_ctx1k_aligned", b1 | aligned)]


@dataclass
class Section:
    """One section's engine and what its rows need."""
    name: str
    k: int
    model: object
    engine: object
    rep: Report
    mtp: MtpAlignment | None
    wb: dict
    seed: int

    def measured_run(self, label: str, n: int, ctx: int, new: int, aligned: bool, profile_steps: int,
                     warmup: bool) -> dict:
        """The row's run, after a warm-up on the same shapes (Triton compiles each new specialisation on first use),
        with the MTP-aligned weights switched in for the pair if `aligned`."""
        vocab = min(self.model.config.vocab_size, 150000)  # prompts below the special ids
        if aligned:
            self.mtp.align()
        try:
            if warmup:
                run(self.engine, random_prompts(n, ctx, self.seed + 999, vocab), min(new, 8),
                    f"{self.name}-{label}-warmup")
            return run(self.engine, random_prompts(n, ctx, self.seed + len(self.rep.data["rows"]), vocab), new,
                       f"{self.name}-{label}", profile_steps)
        finally:
            if aligned:
                self.mtp.restore()

    def measure_row(self, label: str, n: int, ctx: int, new: int, aligned: bool = False, profile_steps: int = 0,
                    warmup: bool = True) -> None:
        rep = self.rep
        if rep.left_s() < 5:
            rep.data["skipped"].append(f"{self.name}/{label}: time budget spent")
            return
        try:
            row = self.measured_run(label, n, ctx, new, aligned, profile_steps, warmup)
        except Exception:
            rep.error(f"{self.name}/{label}")
            return
        row.update(section=self.name, label=label, k=self.k, graphs=self.engine.runner.graphs is not None,
                   aligned=aligned)
        if "decode_tok_s" in row and rep.data.get("copy_gbps"):
            row["roofline"] = roofline(self.model, self.engine.runner.cache, self.wb, n, ctx + new // 2, row,
                                       rep.data["copy_gbps"])
        rep.data["rows"].append(row)
        rep.write()
        brief = {x: row.get(x) for x in ("decode_tok_s", "step_ms_median", "prefill_tok_s", "acceptance",
                                         "tokens_per_step")}
        print(f"[{self.name}] {label}: {brief}", flush=True)


def section(name: str, model, args, sizes: Sizes, rep: Report, mtp: MtpAlignment | None, wb: dict) -> None:
    device = torch.device(args.device)
    k = {"graphs": 0, "eager": 0, "mtp1": 1, "mtp2": 2, "mtp3": 3}[name]
    if k and model.config.num_mtp_layers == 0:
        rep.data["skipped"].append(f"{name}: the model has no MTP head")
        return
    engine, info = start_engine(name, model, args, sizes, k, rep)
    s = Section(name, k, model, engine, rep, mtp, wb, seed=100 * SECTIONS.index(name))
    try:
        for label, kw in section_rows(name, sizes, mtp is not None):
            s.measure_row(label, **kw)
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny dimensions, 4 layers, short prompts (CPU check)")
    p.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {REAL_LAYERS}; 4 with --small)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights instead of FP8 block-128")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this many seconds (0: none)")
    p.add_argument("--out", type=Path, default=None, help="JSON; default $OUT/full_shape.json or ./full_shape.json")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: use --device cpu --small for the plumbing check")
    args.names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.names) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(args.names) - set(SECTIONS))}")
    return args


def build_model(args, rep: Report, device: torch.device):
    """The random model at the real shape (or --small's), on the device; its size and the memory left recorded."""
    layers = args.layers or (4 if args.small else REAL_LAYERS)
    vocab = 4096 if args.small else REAL_VOCAB
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    return model, wb


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    out = default_out(args.out, "full_shape.json")
    rep = Report(out, args.budget_s)
    sizes = Sizes(args.small)
    rep.data.update(args={k: str(v) for k, v in vars(args).items() if k != "names"}, torch=torch.__version__,
                    host=platform.node(), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    sizes=vars(sizes))
    try:
        import triton
        rep.data["triton"] = triton.__version__
    except ImportError:
        pass
    model, wb = build_model(args, rep, device)
    mtp = MtpAlignment(model) if model.config.num_mtp_layers else None
    with torch.inference_mode():
        for name in args.names:
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
