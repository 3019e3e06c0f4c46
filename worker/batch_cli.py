"""`qnext-batch`: offline batch inference over a JSONL file (what vLLM's run_batch is to its users).

Each input line: {"id"?: str, "text": str | "token_ids": [int], "sampling"?: {...}, "stopping"?: {...},
"top_logprobs"?: int, "num_speculative_tokens"?: int}, with the service proto's field names (SamplingParams: temperature, top_p, top_k, min_p,
repetition_penalty, presence_penalty, frequency_penalty, seed; StoppingCriteria: max_new_tokens,
min_new_tokens, stop_strings, stop_token_ids, ignore_eos, include_stop_strings).
Each output line: {"id", "token_ids", "text", "finish_reason", "usage": {...}}, in input order; a bad line
is reported (stderr and an {"id", "line", "error"} output line) and skipped, the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tokenizers import Tokenizer

from qnext.worker.cli_help import HelpFormatter
from qnext.worker.engine_flags import add_engine_flags, engine_config_from_args, name_the_flag
from qnext.worker.types import GenerationRequest, SamplingParams, StoppingParams

if TYPE_CHECKING:
    from qnext.worker.engine import Engine

_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed"}
_STOPPING_FIELDS = {"max_new_tokens", "min_new_tokens", "stop_strings", "stop_token_ids", "ignore_eos",
                    "include_stop_strings"}


@dataclass
class Job:
    line: int
    id: str
    prompt: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    stop_strings: list[str]
    include_stop_strings: bool
    num_speculative_tokens: int | None = None
    tokens: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    draft_steps: int = 0
    finish_reason: str | None = None
    matched_stop: str | None = None


def _fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: must be an object")
    unknown = set(obj) - allowed
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown field")
    return obj


def parse_line(line_no: int, raw: str, tokenizer: Tokenizer, vocab_size: int) -> Job:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if ("text" in obj) == ("token_ids" in obj):
        raise ValueError("input: give exactly one of text or token_ids")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("text: must be a non-empty string")
        prompt = tokenizer.encode(obj["text"], add_special_tokens=False).ids
    else:
        prompt = obj["token_ids"]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("token_ids: must be a non-empty list of integers")
        if any(not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"token_ids: ids must be in [0, {vocab_size})")
    s = _fields(obj.get("sampling"), _SAMPLING_FIELDS, "sampling")
    st = dict(_fields(obj.get("stopping"), _STOPPING_FIELDS, "stopping"))
    stop_strings = st.pop("stop_strings", [])
    include = bool(st.pop("include_stop_strings", False))
    if "stop_token_ids" in st:
        st["stop_token_ids"] = tuple(st["stop_token_ids"])
    try:
        sampling = SamplingParams(**s, top_logprobs=int(obj.get("top_logprobs", 0)))
        stopping = StoppingParams(**st)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    k = obj.get("num_speculative_tokens")
    if k is not None and (not isinstance(k, int) or k < 0):
        raise ValueError("num_speculative_tokens: must be a non-negative integer")
    return Job(line_no, str(obj.get("id", f"line-{line_no}")), prompt, sampling, stopping, list(stop_strings),
               include, k)


def _check_stop_strings(job: Job, tokenizer: Tokenizer) -> bool:
    """True when the decoded output contains one of the job's stop strings (then the text is cut there)."""
    text = tokenizer.decode(job.tokens, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in job.stop_strings if s in text]
    if not hits:
        return False
    job.matched_stop = min(hits)[1]
    return True


def _result(job: Job, tokenizer: Tokenizer) -> dict[str, Any]:
    text = tokenizer.decode(job.tokens, skip_special_tokens=True)
    if job.matched_stop is not None:
        cut = text.find(job.matched_stop)
        text = text[: cut + (len(job.matched_stop) if job.include_stop_strings else 0)]
    return {"id": job.id, "token_ids": job.tokens, "text": text, "finish_reason": job.finish_reason,
            "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens)},
            "spec": {"drafted_tokens": job.drafted, "accepted_tokens": job.accepted,
                     "draft_steps": job.draft_steps}}


def run(engine: Engine, tokenizer: Tokenizer, src: TextIO, dst: TextIO, progress: bool) -> tuple[int, int]:
    """Returns (completed, rejected)."""
    jobs: dict[str, Job] = {}
    records: list[dict[str, Any] | Job] = []
    rejected = 0
    for line_no, raw in enumerate(src, start=1):
        if not raw.strip():
            continue
        try:
            job = parse_line(line_no, raw, tokenizer, engine.vocab_size)
            key = f"{line_no}:{job.id}"
            engine.add_request(GenerationRequest(key, job.prompt, job.sampling, job.stopping,
                                                 job.num_speculative_tokens))
        except ValueError as e:
            rejected += 1
            print(f"qnext-batch: line {line_no}: {e}; skipped", file=sys.stderr)
            records.append({"line": line_no, "error": str(e)})
            continue
        jobs[key] = job
        records.append(job)
    done = 0
    while engine.has_unfinished():
        for out in engine.step():
            job = jobs[out.request_id]
            job.tokens += out.new_token_ids
            job.drafted, job.accepted, job.draft_steps = (out.num_drafted_tokens, out.num_accepted_tokens,
                                                          out.num_draft_steps)
            if out.finished:
                job.finish_reason = job.finish_reason or (out.finish_reason.value if out.finish_reason else None)
                done += 1
            elif job.stop_strings and out.new_token_ids and _check_stop_strings(job, tokenizer):
                job.finish_reason = "stop_string"
                engine.abort(out.request_id)
        if progress:
            print(f"\rqnext-batch: {done}/{len(jobs)} done", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    for rec in records:
        dst.write(json.dumps(_result(rec, tokenizer) if isinstance(rec, Job) else rec, ensure_ascii=False) + "\n")
    return len(jobs), rejected


def _prepare_output(path: Path) -> str | None:
    """Create the output's missing parent directories; returns why `path` cannot be written, or None."""
    if path.is_dir():
        return f"{path} is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"cannot create directory {path.parent}: a file of that name exists"
    except OSError as e:
        return f"cannot create directory {path.parent}: {e.strerror or e}"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"cannot write {path}: permission denied"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext-batch", description="Offline batch inference over a JSONL file.",
                                formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="JSONL input, one request per line")
    p.add_argument("--output", required=True, type=Path,
                   help="JSONL output, one result per input line (missing parent directories are created)")
    # EngineConfig's flags, as qnext-serve has them (a line's num_speculative_tokens may ask for fewer drafts)
    add_engine_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    config = engine_config_from_args(args, p)  # all checked before the model loads, --output's folders last
    if not args.input.is_file():
        p.error(f"--input: no such file: {args.input}")
    problem = _prepare_output(args.output)
    if problem:
        p.error(f"--output: {problem}")
    from qnext.worker.engine import Engine  # torch: only once the command line is known to be good
    try:
        engine = Engine(config)
    except FileNotFoundError as e:
        p.error(f"--model: {e}")
    except ValueError as e:  # no MTP head for the drafts, a cache budget that holds nothing, ...
        p.error(name_the_flag(str(e)))
    tokenizer = Tokenizer.from_file(str(engine.runner.model_dir / "tokenizer.json"))
    info = engine.cache_info
    print(f"qnext-batch: model {engine.runner.model_dir}, cache {info.num_kv_tokens} KV tokens, "
          f"{info.num_slots} sequences; CUDA graphs: {engine.runner.describe_graphs()}",
          file=sys.stderr)
    try:
        with open(args.input) as src, open(args.output, "w") as dst:
            completed, rejected = run(engine, tokenizer, src, dst, progress=sys.stderr.isatty())
    finally:
        engine.close()
    c = engine.spec.counters
    spec = (f"; MTP drafted {c.num_drafted}, accepted {c.num_accepted} "
            f"({c.mean_acceptance_length:.2f} tokens per verify step)" if c.num_verify_steps else "")
    print(f"qnext-batch: {completed} completed, {rejected} rejected -> {args.output}{spec}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
