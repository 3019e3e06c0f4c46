"""What the decode CUDA graphs buy: one decode / verify step of the target model, eager vs graph replay.

A benchmark plus a capture check, for a GPU session with little time: one command builds a Qwen3-Next model with
the real per-layer dimensions (hidden 2048; attention 16 q / 2 kv heads of 256; Gated DeltaNet 16 key / 32 value
heads of 128, conv kernel 4; MoE 512 experts top-10, moe_intermediate 512, shared expert 512) but only --layers
layers (default 4: one block of 3 DeltaNet + 1 full attention) and a small vocabulary, random bf16 weights built
directly on the device (no checkpoint is written: 4 real layers are ~13 GB, mostly experts). Then for each batch
size B and tokens per sequence q (1 = plain decode, 3 = a verify step of 2 MTP drafts) it times

  eager  model(batch, cache), with a fresh ForwardBatch built each step by the engine's own build_forward_batch
  graph  target_runner(...).forward(batch) (same fresh ForwardBatch; loads it into the static buffers, refills
         the kernels' varlen tables, replays the bucket's graph, copies the output out)
  replay graph.replay() alone (what the launch costs once the inputs are in place; CUDA only)

and prints eager / graph ms, their ratio and (eager - graph) / layers, an estimate of the launch overhead a
graph saves per layer. Multiply by 48 for the full model only with care: the lm_head, sampling and the MTP
passes are outside both timings.

Before timing each shape it checks the capture: the same step is run eagerly and through the runner from the same
cache state (the touched state slots and KV slots are snapshotted and restored in between), and the final hidden
states and the DeltaNet states the step leaves behind are compared (rel err printed; FAIL above tolerance, and
exit status 1). The timed batch sizes are buckets themselves (no padding rows), so a few that are not (--check-padded,
default 5 and the largest - 1) are checked too, untimed. A failed capture is reported and eager is still timed.

The context is synthetic: each of the B sequences owns ceil(context / 16) shuffled 16-token KV blocks holding
random K/V and a state slot holding random DeltaNet state; nothing is prefilled (attention's cost depends only on
the lengths, DeltaNet's not at all on the context). Every timed step rewrites the same positions (the last q of
the context), so context lengths and KV slots stay fixed and valid; the DeltaNet states do advance in place each
step, which changes values, not cost.

Timing: per step, wall time from before building the ForwardBatch to after torch.cuda.synchronize() (the engine
synchronises every step too), median over --iters after --warmup steps; eager and graph steps alternate so a
drifting clock or a busy neighbour hits both alike.

Graph attention picks its key splits for --max-model-len (what the engine passes: the model's 262144 unless
--max-model-len is set), eager attention for this step's context; pass --max-model-len equal to --context to
compare launch overhead alone.

    python bench/graphs.py                                   # on a GPU: B 1,8,64,256 x q 1,3, 4 real layers
    python bench/graphs.py --fp8 --out graphs_fp8.json       # FP8 block-128 linears and experts
    python bench/graphs.py --no-capture                      # padded-eager: static buffers, nothing captured
    python bench/graphs.py --device cpu --small --batch-sizes 1,4 --iters 3   # plumbing check, seconds
    python bench/graphs.py --device cpu --small --interpret --context 64 --batch-sizes 1,2 --iters 1
                                       # the Triton kernels under the interpreter (slow; checks the table refills)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from bench.bench_common import default_out, rel_err, sync, write_json  # noqa: E402
from bench.graph_context import BLOCK_SIZE, Context  # noqa: E402
from bench.random_model import build_random_model, random_config  # noqa: E402


@dataclass
class Row:
    batch: int
    q: int
    bucket: int  # the captured batch size that ran it (> batch: padding rows)
    eager_ms: float
    graph_ms: float
    replay_ms: float | None  # graph.replay() alone; None without capture
    speedup: float  # eager / graph
    saved_us_per_layer: float  # (eager - graph) / layers
    rel_err_hidden: float
    rel_err_state: float
    ok: bool


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (every 4th is full attention)")
    p.add_argument("--small", action="store_true", help="worker/tiny.py's dimensions instead of the real ones")
    p.add_argument("--fp8", action="store_true", help="FP8 block-128 weights where the real FP8 checkpoint has them")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (only the embedding lookup reads it)")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--query-lens", default="1,3", help="tokens per sequence: 1 = decode, 1 + k = verify of k drafts")
    p.add_argument("--context", type=int, default=1024, help="tokens in each sequence's cache after the step")
    p.add_argument("--max-model-len", type=int, default=262144,
                   help="handed to the graph runner (block-table width, attention's split choice)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) / float32 (default on CPU)")
    p.add_argument("--no-capture", action="store_true", help="padded-eager on CUDA too (capture=False)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels under TRITON_INTERPRET=1 instead of the torch references")
    p.add_argument("--check-padded", default=None,
                   help="batch sizes (not buckets) whose padded steps are checked, not timed; default 5 and the "
                        "largest batch - 1; '' for none")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results; default $OUT/graphs.json or ./graphs.json")
    return p.parse_args()


def check_args(args: argparse.Namespace, device: torch.device) -> None:
    if args.interpret:
        if device.type != "cpu":
            sys.exit("--interpret is for --device cpu (on a GPU the Triton kernels run natively)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' first @triton.jit import
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run with --device cpu --small for the plumbing check")
    if not max(int(q) for q in args.query_lens.split(",")) < args.context <= args.max_model_len:
        sys.exit("--context must exceed the largest query length (every sequence continues a context) and be at "
                 "most --max-model-len")


@dataclass
class Setup:
    """The run: its settings, the model on its synthetic context, the graph runner (None if it failed to build)
    and the result document, written after every shape."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    batch_sizes: list[int]
    query_lens: tuple[int, ...]
    tol: float
    model: object = None
    cache: object = None
    ctx: Context | None = None
    runner: object = None
    result: dict | None = None

    def sync(self) -> None:
        sync(self.device)

    def write(self) -> None:
        write_json(default_out(self.args.out, "graphs.json"), self.result)


def new_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # bf16 matmuls reorder sums across batch shapes: 2% relative on the final hidden states still means "the
    # same computation"; a capture bug (stale table, wrong buffer, lost write) is O(1)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    s = Setup(args, device, dtype, [int(b) for b in args.batch_sizes.split(",")],
              tuple(int(q) for q in args.query_lens.split(",")), tol)
    s.result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "torch": torch.__version__, "host": platform.node(), "rows": [], "errors": [],
                "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else f"cpu ({os.cpu_count()} cores)")}
    return s


def build(s: Setup) -> None:
    """The random model (no MTP head: its passes are not captured here) and the cache holding the context."""
    from qnext.worker.cache_tensors import CacheShape, CacheTensors
    args, dtype, max_batch = s.args, s.dtype, max(s.batch_sizes)
    raw, cfg = random_config(args.layers, args.vocab, args.fp8, mtp=False, small=args.small)
    start = time.perf_counter()
    s.model = build_random_model(cfg, s.device, dtype, args.seed)
    s.sync()
    s.result["build_s"] = time.perf_counter() - start
    s.result["weights_gib"] = sum(p.numel() * p.element_size() for p in s.model.parameters()) / 2 ** 30
    per_seq = -(-args.context // BLOCK_SIZE)
    s.cache = CacheTensors(cfg, CacheShape(max_batch * per_seq, BLOCK_SIZE, max_batch, dtype, torch.float32,
                                           dtype, dtype, max(s.query_lens) - 1, padding_slot=True), s.device)
    s.ctx = Context(cfg, s.cache, max_batch, args.context, s.device, args.seed)
    dims = {k: raw[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size")}
    s.result["model"] = dict(dims, layers=list(cfg.layer_types), fp8=cfg.quant is not None, dtype=str(dtype))
    print(f"{s.result['device']}  torch {torch.__version__}  {'tiny' if args.small else 'real'} dims, "
          f"{args.layers} layers ({len(cfg.full_attention_layers)} attention), "
          f"{'FP8' if cfg.quant else str(dtype).replace('torch.', '')} weights {s.result['weights_gib']:.2f} GiB "
          f"built in {s.result['build_s']:.1f} s; context {args.context}, max_model_len {args.max_model_len}")


def build_runner(s: Setup) -> None:
    """The target graph runner over every bucket up to the largest batch; a failure is reported and eager is still
    measured (the GPU session should not come back empty)."""
    from qnext.worker.graph_runner import target_runner
    capture = s.device.type == "cuda" and not s.args.no_capture
    try:
        s.sync()
        runner = target_runner(s.model, s.cache, max_batch=max(s.batch_sizes), max_model_len=s.args.max_model_len,
                               block_size=BLOCK_SIZE, query_lens=s.query_lens, capture=capture)
        s.sync()
        s.result["graphs"] = dict(describe=runner.describe(), num_graphs=runner.stats.num_graphs,
                                  capture_s=runner.stats.capture_s, buckets=runner.buckets)
        if s.device.type == "cuda":
            s.result["graphs"]["memory_allocated_gib"] = torch.cuda.memory_allocated(s.device) / 2 ** 30
        print(f"graph runner: {runner.describe()}; capture time {runner.stats.capture_s:.2f} s, "
              f"{runner.stats.num_graphs} graphs")
        s.runner = runner
    except Exception:
        tb = traceback.format_exc()
        print(f"graph runner construction FAILED (capture={capture}):\n{tb}", file=sys.stderr)
        s.result["errors"].append({"where": "DecodeGraphRunner", "traceback": tb})


def check(s: Setup, h: dict) -> tuple[float, float]:
    """Eager and runner from the same cache state: rel err of the outputs and of the states left behind."""
    snap = s.ctx.snapshot(h)
    want = s.model(s.ctx.batch(h), s.cache)
    want_state = s.ctx.states_after(h)
    s.ctx.restore(snap)
    got = s.runner.forward(s.ctx.batch(h))
    return rel_err(got, want), rel_err(s.ctx.states_after(h), want_state)


def record_error(s: Setup, where: str) -> None:
    tb = traceback.format_exc()
    print(f"{where} FAILED:\n{tb}", file=sys.stderr)
    s.result["errors"].append({"where": where, "traceback": tb})


def time_alternating(fns: dict[str, Callable[[], object]], sync: Callable[[], None], warmup: int,
                     iters: int) -> dict[str, float]:
    """Median ms per call of each fn, the fns called in turn each iteration, each call synchronised."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(iters):
        for n, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[n].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def time_shape(s: Setup, B: int, q: int, bucket: int) -> Row:
    """One timed (B, q) shape, its capture checked first."""
    model, ctx, runner, cache = s.model, s.ctx, s.runner, s.cache
    h = ctx.host_lists(B, q)
    fns = {"eager": lambda: model(ctx.batch(h), cache)}
    err_h = err_s = float("nan")
    if runner is not None:
        err_h, err_s = check(s, h)
        fns["graph"] = lambda: runner.forward(ctx.batch(h))
        if (bucket, q) in runner._graphs:  # private: the replay alone, to split the costs
            fns["replay"] = runner._graphs[(bucket, q)][0].replay
    t = time_alternating(fns, s.sync, s.args.warmup, s.args.iters)
    graph_ms = t.get("graph", float("nan"))
    return Row(B, q, bucket, t["eager"], graph_ms, t.get("replay"), t["eager"] / graph_ms,
               (t["eager"] - graph_ms) * 1e3 / s.args.layers, err_h, err_s, err_h < s.tol and err_s < s.tol)


def time_shapes(s: Setup) -> list[Row]:
    from qnext.worker.graph_runner import batch_buckets
    buckets = batch_buckets(max(s.batch_sizes))
    rows: list[Row] = []
    for q in s.query_lens:
        for B in s.batch_sizes:
            try:
                rows.append(time_shape(s, B, q, next(b for b in buckets if b >= B)))
            except Exception:
                record_error(s, f"B={B} q={q}")
                continue
            s.result["rows"] = [asdict(r) for r in rows]
            s.write()  # after every shape: a run cut short by the time limit still leaves its rows
    return rows


def padded_checks(s: Setup) -> list[dict]:
    """The default batch sizes are buckets themselves, so their steps have no padding rows; these checks (not
    timed) run steps with padding rows, which must neither change the real rows nor write their state."""
    from qnext.worker.graph_runner import batch_buckets
    max_batch = max(s.batch_sizes)
    buckets = batch_buckets(max_batch)
    wanted = f"5,{max_batch - 1}" if s.args.check_padded is None else s.args.check_padded
    padded = sorted({B for B in map(int, filter(None, wanted.split(","))) if B <= max_batch and B not in buckets})
    checks: list[dict] = []
    for q in s.query_lens if s.runner is not None else ():
        for B in padded:
            try:
                err_h, err_s = check(s, s.ctx.host_lists(B, q, step=1))
            except Exception:
                record_error(s, f"padded check B={B} q={q}")
                continue
            bucket = next(b for b in buckets if b >= B)
            checks.append(dict(batch=B, q=q, bucket=bucket, rel_err_hidden=err_h, rel_err_state=err_s,
                               ok=err_h < s.tol and err_s < s.tol))
    return checks


def runner_stats(s: Setup) -> None:
    if s.runner is not None:
        s.result["graphs"]["stats"] = asdict(s.runner.stats)
        if s.runner.stats.eager_steps:  # a step that did not qualify ran eagerly: its figures are void
            s.result["errors"].append({"where": "runner", "traceback": f"{s.runner.stats.eager_steps} steps "
                                       f"fell back to eager"})
    if s.device.type == "cuda":
        s.result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(s.device) / 2 ** 30


def print_table(rows: list[Row], layers: int) -> None:
    head = (f"{'batch':>5} {'q':>2} {'bucket':>6} {'eager ms':>9} {'graph ms':>9} {'replay ms':>9} "
            f"{'eager/graph':>11} {'saved us/layer':>14} {'rel err out':>11} {'rel err state':>13}  check")
    print(head)
    print("-" * len(head))
    for r in rows:
        replay = f"{r.replay_ms:9.3f}" if r.replay_ms is not None else f"{'-':>9}"
        print(f"{r.batch:>5} {r.q:>2} {r.bucket:>6} {r.eager_ms:>9.3f} {r.graph_ms:>9.3f} {replay} "
              f"{r.speedup:>10.2f}x {r.saved_us_per_layer:>14.1f} {r.rel_err_hidden:>11.1e} "
              f"{r.rel_err_state:>13.1e}  {'ok' if r.ok else 'FAIL'}")
    print(f"(saved us/layer = (eager - graph) / {layers} layers)")


def finish(s: Setup, rows: list[Row], checks: list[dict]) -> None:
    """The table, the padded checks, the JSON; exit status 1 on an error or a failed check."""
    print()
    print_table(rows, s.args.layers)
    for c in checks:
        print(f"padded check: batch {c['batch']} in bucket {c['bucket']}, q {c['q']}: rel err out "
              f"{c['rel_err_hidden']:.1e}, state {c['rel_err_state']:.1e}  {'ok' if c['ok'] else 'FAIL'}")
    s.result["rows"] = [asdict(r) for r in rows]
    s.write()
    print(f"\nwrote {default_out(s.args.out, 'graphs.json')}")
    failed = [r for r in rows if not r.ok] + [c for c in checks if not c["ok"]]
    if s.result["errors"] or failed:
        print(f"{len(s.result['errors'])} error(s), {len(failed)} failed check(s) (tolerance {s.tol:g})",
              file=sys.stderr)
        sys.exit(1)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    check_args(args, device)
    from contextlib import nullcontext

    from qnext.kernels.dispatch import force_triton
    torch.manual_seed(args.seed)
    s = new_setup(args, device)
    with torch.inference_mode(), (force_triton() if args.interpret else nullcontext()):
        build(s)
        build_runner(s)
        rows = time_shapes(s)
        s.result["padded_checks"] = checks = padded_checks(s)
        runner_stats(s)
    finish(s, rows, checks)


if __name__ == "__main__":
    main()
