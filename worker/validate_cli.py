"""`qnext-validate`: how closely a checkpoint follows a reference (e.g. FP8 vs BF16), and how fast each runs.

    qnext-validate --model Qwen3-Next-80B-A3B-Instruct-FP8 --reference Qwen3-Next-80B-A3B-Instruct --device cuda
    qnext-validate --model A --reference B --prompts prompts.txt --max-new-tokens 64 --out validate.json
    qnext-validate --model A --reference A --kv-cache-dtype fp8      # what the FP8 KV cache alone costs

For each prompt the reference generates a greedy continuation of N tokens (ignore_eos, so N is exact). Both
checkpoints are then run teacher-forced over prompt + that continuation, and at each of the N positions:
  KL(reference || model) of the next-token distributions (nats), and whether their top-1 tokens agree.
Each checkpoint also generates its own greedy continuation; the match length is how many leading tokens equal
the reference's. Latency comes from the engine's own step loop at batch 1 (after a warm-up): prefill = time
to the first token, decode = mean time per later token.

The checkpoints are loaded one after the other (reference first), never together: an 80B model in BF16 and
in FP8 do not fit one GPU at once. The reference's log-probs are kept on the CPU meanwhile ([N, vocab] fp32
per prompt: ~19 MB for N = 32 at the Qwen vocabulary).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from qnext.worker.cli_help import HelpFormatter
from qnext.worker.engine import Engine
from qnext.worker.engine_flags import add_engine_flags, engine_config_from_args, name_the_flag
from qnext.worker.model_runner import SeqChunk, build_forward_batch
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Explain, step by step, why the sky is blue.",
    "def fibonacci(n):\n    ",
    "Translate into German: The weather is nice today.",
    "从前有一座山，山上有一座庙，",
    "List three prime numbers greater than 100:",
    "Write a haiku about a lighthouse.",
    "SELECT name, COUNT(*) FROM orders GROUP BY",
]

# The EngineConfig fields qnext-validate sets itself, so they are not flags here:
#   model                      two checkpoints, --model and --reference, both required
#   max_num_seqs               1: latency is measured at batch 1, one prompt at a time
#   max_model_len              set per run: the longest prompt + N + 1
#   enable_prefix_caching      off: the warm-up and the scoring pass repeat prompts, and a cache hit would time
#   num_checkpoints            no prefill (so there are no prefix-cache checkpoints to count either)
#   num_speculative_tokens     0: what is compared is each model's own greedy decoding, and MTP drafts would make
#                              the decode latency measure the MTP head's acceptance (bench/spec_decode.py does)
#                              and need both checkpoints to have one
#   seed                       nothing is sampled: every continuation is greedy
#   cuda_graph_max_batch_size  1: batch 1 only ever replays the size-1 decode graph
# The rest (--device, --dtype, --tensor-parallel-size, --cache-memory, --enforce-eager, ...) apply to both runs,
# except --kv-cache-dtype: it applies to --model's run, while the reference keeps its KV in the activation dtype,
# so the comparison includes what a quantised KV cache costs (--model = --reference: that cost alone).
FIXED_OPTIONS = {"model": None, "max_num_seqs": 1, "max_model_len": None, "enable_prefix_caching": False,
                 "num_checkpoints": 0, "num_speculative_tokens": 0, "seed": None, "cuda_graph_max_batch_size": 1}
ENGINE_DEFAULTS = EngineConfig(**FIXED_OPTIONS)


@dataclass
class Timing:
    prefill_ms: float  # request added -> first token
    decode_ms_per_token: float  # mean over the tokens after the first


@dataclass
class PromptResult:
    prompt: str
    num_prompt_tokens: int
    kl_mean: float  # nats, mean over the N positions
    kl_max: float
    top1_agreement: float  # fraction of the N positions
    match_length: int  # leading tokens of the model's greedy continuation equal to the reference's
    continuation: list[int]  # the model's greedy continuation
    reference_continuation: list[int]  # the reference's: the sequence both were teacher-forced over
    model: Timing
    reference: Timing


def greedy_timed(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], Timing]:
    """The greedy continuation of n tokens through the engine's step loop, timed per token."""
    engine.add_request(GenerationRequest(f"validate-{time.monotonic_ns()}", prompt, SamplingParams(temperature=0.0),
                                         StoppingParams(max_new_tokens=n, ignore_eos=True)))
    tokens: list[int] = []
    stamps: list[float] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            stamps += [time.perf_counter()] * len(out.new_token_ids)
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return tokens, Timing((stamps[0] - start) * 1000, decode * 1000)


@torch.inference_mode()
def teacher_forced_logprobs(engine: Engine, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[N, vocab] fp32 log-probs on the CPU of the next token at each of the continuation's N positions, from
    one forward over prompt + continuation[:-1] (the engine must be idle: it lends this sequence its cache)."""
    ids = prompt + continuation[:-1]
    got = engine.cache_manager.ensure([], None, len(ids))
    if got is None:
        raise ValueError(f"--cache-memory: too small for one sequence of {len(ids)} tokens")
    blocks, slot = got
    try:
        batch = build_forward_batch([SeqChunk(blocks, slot, 0, ids)], engine.config.block_size, engine.runner.device)
        hidden = engine.runner.model(batch, engine.runner.cache)
        logits = engine.runner.model.compute_logits(hidden[len(prompt) - 1:])
        return torch.log_softmax(logits.float(), dim=-1).cpu()
    finally:
        engine.cache_manager.release(blocks, slot)


@dataclass
class CheckpointRun:
    continuations: list[list[int]]  # its own greedy continuation per prompt
    logprobs: list[torch.Tensor]  # teacher-forced over the reference's continuation, per prompt
    timings: list[Timing]
    vocab_size: int


def run_checkpoint(config: EngineConfig, prompts: list[list[int]], n: int,
                   reference: list[list[int]] | None) -> CheckpointRun:
    """Load, warm up, generate and score every prompt, free. reference None: this is the reference."""
    engine = Engine(config)
    try:
        greedy_timed(engine, prompts[0], 2)  # first-call costs (allocator, kernel selection) out of the timings
        conts, timings, lps = [], [], []
        for i, p in enumerate(prompts):
            cont, timing = greedy_timed(engine, p, n)
            conts.append(cont)
            timings.append(timing)
            lps.append(teacher_forced_logprobs(engine, p, cont if reference is None else reference[i]))
        return CheckpointRun(conts, lps, timings, engine.vocab_size)
    finally:
        engine.close()  # the other tensor-parallel ranks, if any
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(ref: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(ref || model) in nats [N], and top-1 agreement [N] bool. Inputs: [N, V] log-probs."""
    kl = (ref.exp() * (ref - model)).sum(-1).clamp_min(0.0)  # clamp: rounding can dip a hair below 0
    return kl, ref.argmax(-1) == model.argmax(-1)


def match_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def validate(model: str, reference: str, prompts: list[str], max_new_tokens: int,
             engine: EngineConfig = ENGINE_DEFAULTS) -> list[PromptResult]:
    """`engine`: the options both checkpoints run with (the reference with kv_cache_dtype auto); its model and
    max_model_len are set here."""
    tokenizer = Tokenizer.from_file(str(Path(reference) / "tokenizer.json"))
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    if any(not p for p in ids):
        raise ValueError("--prompts: a prompt encodes to no tokens")
    max_len = max(len(p) for p in ids) + max_new_tokens + 1
    cfg = replace(engine, max_model_len=max_len)
    ref = run_checkpoint(replace(cfg, model=reference, kv_cache_dtype="auto"), ids, max_new_tokens, None)
    mod = run_checkpoint(replace(cfg, model=model), ids, max_new_tokens, ref.continuations)
    if mod.vocab_size != ref.vocab_size:
        raise ValueError(f"--model: vocab_size {mod.vocab_size} differs from --reference's {ref.vocab_size}")
    results = []
    for i, text in enumerate(prompts):
        kl, agree = compare(ref.logprobs[i], mod.logprobs[i])
        results.append(PromptResult(text, len(ids[i]), kl.mean().item(), kl.max().item(), agree.float().mean().item(),
                                    match_length(mod.continuations[i], ref.continuations[i]), mod.continuations[i],
                                    ref.continuations[i], mod.timings[i], ref.timings[i]))
    return results


def summary(results: list[PromptResult]) -> dict[str, float]:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"kl_mean": mean([r.kl_mean for r in results]), "kl_max": max(r.kl_max for r in results),
            "top1_agreement": mean([r.top1_agreement for r in results]),
            "match_length_mean": mean([r.match_length for r in results]),
            "model_prefill_ms": mean([r.model.prefill_ms for r in results]),
            "reference_prefill_ms": mean([r.reference.prefill_ms for r in results]),
            "model_decode_ms_per_token": mean([r.model.decode_ms_per_token for r in results]),
            "reference_decode_ms_per_token": mean([r.reference.decode_ms_per_token for r in results])}


def format_table(results: list[PromptResult], s: dict[str, float], n: int) -> str:
    pair = lambda a, b: f"{a:.1f} / {b:.1f}"  # noqa: E731
    rows = [f"{'prompt':<32} {'tokens':>6} {'KL mean':>9} {'KL max':>9} {'top-1':>6} {f'match/{n}':>8} "
            f"{'prefill ms (model/ref)':>23} {'decode ms/tok (model/ref)':>26}"]
    for r in results:
        label = r.prompt.replace("\n", " ")[:32]
        rows.append(f"{label:<32} {r.num_prompt_tokens:>6} {r.kl_mean:9.2e} {r.kl_max:9.2e} {r.top1_agreement:6.3f} "
                    f"{r.match_length:>8} {pair(r.model.prefill_ms, r.reference.prefill_ms):>23} "
                    f"{pair(r.model.decode_ms_per_token, r.reference.decode_ms_per_token):>26}")
    prefill = pair(s["model_prefill_ms"], s["reference_prefill_ms"])
    decode = pair(s["model_decode_ms_per_token"], s["reference_decode_ms_per_token"])
    rows.append(f"{'mean (KL max: max)':<32} {'':>6} {s['kl_mean']:9.2e} {s['kl_max']:9.2e} "
                f"{s['top1_agreement']:6.3f} {s['match_length_mean']:>8.1f} {prefill:>23} {decode:>26}")
    return "\n".join(rows)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines skipped; a literal \\n in a line stands for a newline."""
    try:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"--prompts: {e}") from None
    if not prompts:
        raise ValueError(f"--prompts: no prompts in {path}")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext-validate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory to validate (e.g. the FP8 one)")
    a("--reference", required=True, help="checkpoint directory to compare against (e.g. the BF16 one)")
    a("--prompts", type=Path, help="text file, one prompt per line (default: a built-in set of 8)")
    a("--max-new-tokens", type=int, default=32, help="N: length of the reference's greedy continuation")
    a("--out", type=Path, help="write the results as JSON here (default: only the table on stdout)")
    add_engine_flags(p, exclude=FIXED_OPTIONS)  # applied to both checkpoints' runs
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    engine = engine_config_from_args(args, p, **FIXED_OPTIONS)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
        for flag, d in (("--model", args.model), ("--reference", args.reference)):
            if not (Path(d) / "config.json").is_file():
                raise ValueError(f"{flag}: {d} is not a checkpoint directory (no config.json)")
        if not (Path(args.reference) / "tokenizer.json").is_file():
            raise ValueError(f"--reference: {args.reference} has no tokenizer.json")
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
        results = validate(args.model, args.reference, prompts, args.max_new_tokens, engine)
    except ValueError as e:
        print(f"qnext-validate: {name_the_flag(str(e))}", file=sys.stderr)
        return 2
    s = summary(results)
    print(f"model {args.model}\nreference {args.reference}\n{len(prompts)} prompts, N = {args.max_new_tokens} "
          f"teacher-forced positions each, device {args.device}\n")
    print(format_table(results, s, args.max_new_tokens))
    if args.out:
        options = {k: v for k, v in asdict(engine).items() if k not in ("model", "max_model_len")}
        doc = {"model": args.model, "reference": args.reference, "device": args.device, "dtype": args.dtype,
               "engine": options, "max_new_tokens": args.max_new_tokens, "summary": s,
               "prompts": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
