"""What the decode CUDA graphs buy: one decode / verify step of the target model, eager vs graph replay.

A benchmark plus a capture check, for a GPU session with little time: one command builds a Qwen3-Next model with
the real per-layer dimensions (hidden 2048; attention 16 q / 2 kv heads of 256; Gated DeltaNet 16 key / 32 value
heads of 128, conv kernel 4; MoE 512 experts top-10, moe_intermediate 512, shared expert 512) but only --layers
layers (default 4: one block of 3 DeltaNet + 1 full attention) and a small vocabulary, random bf16 weights built
directly on the device (no checkpoint is written: 4 real layers are ~13 GB, mostly experts). Then for each batch
size B and tokens per sequence q (1 = plain decode, 3 = a verify step of 2 MTP drafts) it times

  eager  model(batch, cache), with a fresh ForwardBatch built from host lists each step, as the engine does
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
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from bench.random_model import build_random_model, random_config  # noqa: E402

BLOCK_SIZE = 16  # the engine's default KV block


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


# ---- the synthetic context and the steps --------------------------------------------------------------------

class Context:
    """B sequences of `context` tokens already in the cache (random K/V, random DeltaNet states): sequence i owns
    state slot i and its own shuffled blocks. Host lists of each (B, q) step are built once; `batch()` turns them
    into a fresh ForwardBatch each call, the way the engine's ModelRunner does."""

    def __init__(self, cfg, cache, max_batch: int, context: int, device: torch.device, seed: int) -> None:
        self.cfg, self.cache, self.context, self.device = cfg, cache, context, device
        per_seq = -(-context // BLOCK_SIZE)
        blocks = list(range(max_batch * per_seq))
        random.Random(seed).shuffle(blocks)  # the engine's blocks are scattered too
        self.blocks = [blocks[i * per_seq:(i + 1) * per_seq] for i in range(max_batch)]
        gen = torch.Generator(device=device).manual_seed(seed)
        for pool in (*cache.k_cache, *cache.v_cache):
            pool.copy_(torch.randn(pool.shape, generator=gen, device=device, dtype=pool.dtype))
        cache.conv_state.copy_(torch.randn(cache.conv_state.shape, generator=gen, device=device))
        cache.ssm_state.copy_(0.1 * torch.randn(cache.ssm_state.shape, generator=gen, device=device))

    def host_lists(self, B: int, q: int, step: int = 0) -> dict:
        ids, pos, slots = [], [], []
        for i in range(B):
            for p in range(self.context - q, self.context):  # the last q positions: rewritten every step
                ids.append((7919 * i + 31 * p + step) % self.cfg.vocab_size)
                pos.append(p)
                slots.append(self.blocks[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        return dict(ids=ids, pos=pos, slots=slots, q=q, B=B, tables=[self.blocks[i] for i in range(B)])

    def batch(self, h: dict):
        from qnext.worker.model import ForwardBatch
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(h["ids"], device=dev), positions=torch.tensor(h["pos"], device=dev),
            query_lens=[h["q"]] * h["B"], context_lens=[self.context] * h["B"],
            slot_mapping=torch.tensor(h["slots"], device=dev),
            block_tables=torch.tensor(h["tables"], dtype=torch.int32, device=dev),
            state_slots=torch.tensor(list(range(h["B"])), device=dev),
            is_verify=[True] * h["B"] if h["q"] > 1 else None)

    # what a step can touch: its KV slots in every pool, its sequences' state slots (and their verify states)
    _STATE = ("conv_state", "ssm_state", "spec_conv", "spec_ssm")

    def snapshot(self, h: dict) -> dict:
        kv = torch.tensor(h["slots"], device=self.device)
        st = torch.arange(h["B"], device=self.device)
        pools = [p.flatten(0, 1)[kv].clone() for p in (*self.cache.k_cache, *self.cache.v_cache)]
        states = {n: getattr(self.cache, n)[:, st].clone() for n in self._STATE if getattr(self.cache, n) is not None}
        return dict(kv=kv, st=st, pools=pools, states=states)

    def restore(self, snap: dict) -> None:
        for p, saved in zip((*self.cache.k_cache, *self.cache.v_cache), snap["pools"]):
            p.flatten(0, 1)[snap["kv"]] = saved  # flatten of a contiguous pool is a view: writes land in it
        for n, saved in snap["states"].items():
            getattr(self.cache, n)[:, snap["st"]] = saved

    def states_after(self, h: dict) -> torch.Tensor:
        """The recurrent states the step leaves in its sequences' slots (and, verifying, the per-position ones)."""
        st = torch.arange(h["B"], device=self.device)
        parts = [self.cache.ssm_state[:, st].flatten()]
        if h["q"] > 1:
            parts.append(self.cache.spec_ssm[:, st, :h["q"] - 1].flatten())
        return torch.cat(parts).float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


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


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.interpret:
        if device.type != "cpu":
            sys.exit("--interpret is for --device cpu (on a GPU the Triton kernels run natively)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' first @triton.jit import
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run with --device cpu --small for the plumbing check")
    from contextlib import nullcontext

    from qnext.kernels.dispatch import force_triton
    from qnext.worker.cache_tensors import CacheShape, CacheTensors
    from qnext.worker.graph_runner import batch_buckets, target_runner

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    capture = device.type == "cuda" and not args.no_capture
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    query_lens = tuple(int(q) for q in args.query_lens.split(","))
    max_batch = max(batch_sizes)
    if not max(query_lens) < args.context <= args.max_model_len:
        sys.exit("--context must exceed the largest query length (every sequence continues a context) and be at "
                 "most --max-model-len")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    # no MTP head: its passes are not captured here
    raw, cfg = random_config(args.layers, args.vocab, args.fp8, mtp=False, small=args.small)
    # bf16 matmuls reorder sums across batch shapes: 2% relative on the final hidden states still means "the
    # same computation"; a capture bug (stale table, wrong buffer, lost write) is O(1)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2

    out_path = args.out or (Path(os.environ["OUT"]) / "graphs.json" if os.environ.get("OUT") else Path("graphs.json"))
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "torch": torch.__version__, "host": platform.node(), "rows": [], "errors": []}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    else:
        result["device"] = f"cpu ({os.cpu_count()} cores)"

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    with torch.inference_mode(), (force_triton() if args.interpret else nullcontext()):
        start = time.perf_counter()
        model = build_random_model(cfg, device, dtype, args.seed)
        sync()
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        result["build_s"] = time.perf_counter() - start
        result["weights_gib"] = n_bytes / 2 ** 30
        per_seq = -(-args.context // BLOCK_SIZE)
        cache = CacheTensors(cfg, CacheShape(max_batch * per_seq, BLOCK_SIZE, max_batch, dtype, torch.float32,
                                             dtype, max(query_lens) - 1, padding_slot=True), device)
        ctx = Context(cfg, cache, max_batch, args.context, device, args.seed)
        dims = {k: raw[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "vocab_size")}
        result["model"] = dict(dims, layers=list(cfg.layer_types), fp8=cfg.quant is not None, dtype=str(dtype))
        print(f"{result['device']}  torch {torch.__version__}  {'tiny' if args.small else 'real'} dims, "
              f"{args.layers} layers ({len(cfg.full_attention_layers)} attention), "
              f"{'FP8' if cfg.quant else str(dtype).replace('torch.', '')} weights {result['weights_gib']:.2f} GiB "
              f"built in {result['build_s']:.1f} s; context {args.context}, max_model_len {args.max_model_len}")

        runner = None
        try:
            sync()
            runner = target_runner(model, cache, max_batch=max_batch, max_model_len=args.max_model_len,
                                   block_size=BLOCK_SIZE, query_lens=query_lens, capture=capture)
            sync()
            result["graphs"] = dict(describe=runner.describe(), num_graphs=runner.stats.num_graphs,
                                    capture_s=runner.stats.capture_s, buckets=runner.buckets)
            if device.type == "cuda":
                result["graphs"]["memory_allocated_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
            print(f"graph runner: {runner.describe()}; capture time {runner.stats.capture_s:.2f} s, "
                  f"{runner.stats.num_graphs} graphs")
        except Exception:  # report it and still measure eager: the GPU session should not come back empty
            tb = traceback.format_exc()
            print(f"graph runner construction FAILED (capture={capture}):\n{tb}", file=sys.stderr)
            result["errors"].append({"where": "DecodeGraphRunner", "traceback": tb})
        def check(h: dict) -> tuple[float, float]:
            """Eager and runner from the same cache state: rel err of the outputs and of the states left behind."""
            snap = ctx.snapshot(h)
            want = model(ctx.batch(h), cache)
            want_state = ctx.states_after(h)
            ctx.restore(snap)
            got = runner.forward(ctx.batch(h))
            return rel_err(got, want), rel_err(ctx.states_after(h), want_state)

        buckets = batch_buckets(max_batch)
        rows: list[Row] = []
        for q in query_lens:
            for B in batch_sizes:
                h = ctx.host_lists(B, q)
                bucket = next(b for b in buckets if b >= B)
                try:
                    fns = {"eager": lambda: model(ctx.batch(h), cache)}
                    err_h = err_s = float("nan")
                    if runner is not None:
                        err_h, err_s = check(h)
                        fns["graph"] = lambda: runner.forward(ctx.batch(h))
                        if (bucket, q) in runner._graphs:  # private: the replay alone, to split the costs
                            fns["replay"] = runner._graphs[(bucket, q)][0].replay
                    t = time_alternating(fns, sync, args.warmup, args.iters)
                except Exception:
                    tb = traceback.format_exc()
                    print(f"B={B} q={q} FAILED:\n{tb}", file=sys.stderr)
                    result["errors"].append({"where": f"B={B} q={q}", "traceback": tb})
                    continue
                graph_ms = t.get("graph", float("nan"))
                rows.append(Row(B, q, bucket, t["eager"], graph_ms, t.get("replay"), t["eager"] / graph_ms,
                                (t["eager"] - graph_ms) * 1e3 / args.layers, err_h, err_s,
                                err_h < tol and err_s < tol))
                result["rows"] = [asdict(r) for r in rows]
                write()  # after every shape: a run cut short by the time limit still leaves its rows
        # The default batch sizes are buckets themselves, so their steps have no padding rows; these checks (not
        # timed) run steps with padding rows, which must neither change the real rows nor write their state.
        wanted = f"5,{max_batch - 1}" if args.check_padded is None else args.check_padded
        padded = sorted({B for B in map(int, filter(None, wanted.split(","))) if B <= max_batch and B not in buckets})
        checks: list[dict] = []
        for q in query_lens if runner is not None else ():
            for B in padded:
                try:
                    err_h, err_s = check(ctx.host_lists(B, q, step=1))
                except Exception:
                    tb = traceback.format_exc()
                    print(f"padded check B={B} q={q} FAILED:\n{tb}", file=sys.stderr)
                    result["errors"].append({"where": f"padded check B={B} q={q}", "traceback": tb})
                    continue
                bucket = next(b for b in buckets if b >= B)
                checks.append(dict(batch=B, q=q, bucket=bucket, rel_err_hidden=err_h, rel_err_state=err_s,
                                   ok=err_h < tol and err_s < tol))
        result["padded_checks"] = checks
        if runner is not None:
            result["graphs"]["stats"] = asdict(runner.stats)
            if runner.stats.eager_steps:  # a step that did not qualify ran eagerly: its figures are void
                result["errors"].append({"where": "runner", "traceback": f"{runner.stats.eager_steps} steps "
                                         f"fell back to eager"})
        if device.type == "cuda":
            result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print()
    print_table(rows, args.layers)
    for c in checks:
        print(f"padded check: batch {c['batch']} in bucket {c['bucket']}, q {c['q']}: rel err out "
              f"{c['rel_err_hidden']:.1e}, state {c['rel_err_state']:.1e}  {'ok' if c['ok'] else 'FAIL'}")
    result["rows"] = [asdict(r) for r in rows]
    write()
    print(f"\nwrote {out_path}")
    failed = [r for r in rows if not r.ok] + [c for c in checks if not c["ok"]]
    if result["errors"] or failed:
        print(f"{len(result['errors'])} error(s), {len(failed)} failed check(s) (tolerance {tol:g})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
