"""`qnext-generate`: stream a completion from a qnext server to the terminal.

    qnext-generate "Write a haiku" --chat --max-new-tokens 64 --temperature 0.7
    qnext-generate --token-ids 1,2,3 --server localhost:50051
    qnext-generate "Hi" --server host:50051 --api-key KEY --ssl-ca-certs ca.pem     # see qnext-serve's --api-key
    qnext-generate "A pet as JSON" --chat --json-schema pet.schema.json     # output valid against the schema
    qnext-generate "Weather in Paris?" --chat --tools tools.json --tool-choice required

Text goes to stdout as it arrives (reasoning, when the server splits it, to stderr, dimmed on a TTY), tool calls
as `[tool call N: NAME] ARGUMENTS` lines while their arguments form; the finish line (reason, tokens, timings) goes
to stderr. A --tools file is a JSON list of tools, each {"name", "description", "parameters"} or OpenAI's
{"type": "function", "function": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from qnext.rpc import convert
from qnext.rpc.client import Client
from qnext.rpc.security import ClientSecurity, add_client_security_flags, client_security
from qnext.rpc.tool_calls import Tool
from qnext.worker.cli_help import HelpFormatter


def _fields(args: argparse.Namespace) -> dict:
    f: dict = {}
    if args.token_ids:
        f["token_ids"] = [int(t) for t in args.token_ids.split(",")]
    elif args.chat:
        f["chat"] = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        if args.thinking is not None:
            f["enable_thinking"] = args.thinking == "on"
    else:
        f["text"] = args.prompt
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_new_tokens",
                 "max_reasoning_tokens"):
        if getattr(args, name) is not None:
            f[name] = getattr(args, name)
    if args.n != 1:
        f["n"] = args.n
    if args.stop:
        f["stop_strings"] = args.stop
    if args.logit_bias:
        f["logit_bias"] = parse_logit_bias(args.logit_bias)
    if args.json_schema:
        f["response_format"] = ("json_schema", read_flag_file(args.json_schema, "--json-schema"))
    elif args.regex:
        f["response_format"] = ("regex", args.regex)
    if args.tools:
        f["tools"] = load_tools(args.tools)
    if args.tool_choice:
        f["tool_choice"] = args.tool_choice
    return f


def parse_logit_bias(value: str) -> dict[int, float]:
    """--logit-bias as OpenAI's JSON object {"token id": bias}; ValueError naming the flag (the server checks the
    ids and ranges)."""
    try:
        items = json.loads(value)
        if not isinstance(items, dict):
            raise ValueError("not a JSON object")
        return {int(k): float(v) for k, v in items.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f'--logit-bias: expected a JSON object of token id -> bias, e.g. {{"1234": 5}}: {e}') from None


def read_flag_file(path: str, flag: str) -> str:
    """A file named by a flag, as text; ValueError naming the flag."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None


def load_tools(path: str) -> list[Tool]:
    """A --tools file: a JSON list of {"name", "description", "parameters"} or OpenAI's {"type": "function",
    "function": {...}}; ValueError naming the flag."""
    try:
        items = json.loads(read_flag_file(path, "--tools"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools: {path} is not JSON ({e})") from None
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise ValueError(f"--tools: {path} must hold a JSON list of tool objects")
    tools = []
    for t in items:
        t = t.get("function", t)
        tools.append(Tool(str(t.get("name", "")), str(t.get("description", "")), t.get("parameters") or {}))
    return tools


async def _run(args: argparse.Namespace) -> int:
    dim = sys.stderr.isatty()
    out, err = sys.stdout, sys.stderr
    unended = {out: False, err: False}  # the stream's last write left its line open

    def write(stream, text: str, shown: str | None = None) -> None:
        stream.write(text if shown is None else shown)
        stream.flush()
        unended[stream] = not text.endswith("\n")

    def end_line(*streams) -> None:
        """Ends the open line of each stream: the text then ends with a newline, and what follows (the finish or
        error line, the shell prompt) starts on a line of its own."""
        for stream in streams:
            if unended[stream]:
                write(stream, "\n")

    # the keyword only when something is set (plaintext without a key is Client's default too), so a stand-in
    # Client taking (target, timeout) still fits
    kwargs = {"security": args.security} if args.security != ClientSecurity() else {}
    async with Client(args.server, **kwargs) as client:
        if args.n > 1:
            return await _run_samples(client, args)
        try:
            async for chunk in client.generate_stream(timeout=args.timeout, **args.fields):
                if chunk.reasoning_text:
                    write(err, chunk.reasoning_text, f"\x1b[2m{chunk.reasoning_text}\x1b[0m" if dim else None)
                if chunk.text:
                    end_line(err)  # the reasoning ends where the content starts
                    write(out, chunk.text)
                for d in chunk.tool_calls:
                    if d.id:
                        end_line(out, err)
                        write(out, f"[tool call {d.index}: {d.name}] ")
                    write(out, d.arguments_delta)
                if chunk.HasField("finish"):
                    f = chunk.finish
                    end_line(out, err)
                    print(_finish_line(f), file=err)
        except grpc.aio.AioRpcError as e:
            end_line(out, err)
            print(f"qnext-generate: {e.code().name}: {e.details()}", file=err)
            return 1
        finally:
            end_line(out, err)
    return 0


def _finish_line(f: Any) -> str:
    return (f"[{convert.finish_reason_name(f.reason)}] prompt {f.usage.prompt_tokens} tokens, completion "
            f"{f.usage.completion_tokens} tokens, ttft {f.timings.time_to_first_token_ms:.0f} ms, total "
            f"{f.timings.total_ms:.0f} ms")


async def _run_samples(client: Any, args: argparse.Namespace) -> int:
    """--n > 1: the samples' responses interleave, so each sample is printed whole when it finishes: a
    `[sample i]` line and its reasoning on stderr, its text on stdout, then its finish line."""
    reasoning: dict[int, str] = {}
    text: dict[int, str] = {}
    try:
        async for chunk in client.generate_stream(timeout=args.timeout, **args.fields):
            i = chunk.index
            reasoning[i] = reasoning.get(i, "") + chunk.reasoning_text
            text[i] = text.get(i, "") + chunk.text
            if chunk.HasField("finish"):
                print(f"[sample {i}]", file=sys.stderr)
                if reasoning[i]:
                    print(reasoning[i].rstrip("\n"), file=sys.stderr, flush=True)
                print(text[i].rstrip("\n"), flush=True)
                print(_finish_line(chunk.finish), file=sys.stderr, flush=True)
    except grpc.aio.AioRpcError as e:
        print(f"qnext-generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qnext-generate", description="Stream a completion from a qnext server.",
                                formatter_class=HelpFormatter)
    p.add_argument("prompt", nargs="?", default="",
                   help="prompt text, the user message with --chat (default: empty)")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    p.add_argument("--system", default=None, help="system message, with --chat (default: none)")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="the chat template's enable_thinking (default: the template's own default)")
    p.add_argument("--token-ids", default=None,
                   help="comma-separated prompt token ids instead of text (default: the prompt text)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate at most (default: the server's --max-new-tokens-default, capped by "
                        "what the model length leaves)")
    p.add_argument("--n", type=int, default=1,
                   help="parallel samples of the prompt (1-16; sample i uses --seed + i), each printed whole when it "
                        "finishes")
    p.add_argument("--max-reasoning-tokens", type=int, default=None,
                   help="reasoning budget: after this many tokens inside the think block the prompt opened, the next "
                        "is </think> and the answer follows (default: no budget)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: the server's, from the model's "
                        "generation_config.json)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling (default: the server's, from the model's generation_config.json)")
    p.add_argument("--top-k", type=int, default=None,
                   help="top-k sampling; 0 = off (default: the server's, from the model's generation_config.json)")
    p.add_argument("--min-p", type=float, default=None, help="min-p sampling; 0 = off (default: the server's)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="repetition penalty; 1 = off (default: the server's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: one the server draws)")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable (default: none)")
    p.add_argument("--logit-bias", default=None, metavar="JSON",
                   help='token id -> bias added to its logit, e.g. \'{"1234": 100}\' (default: none)')
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds (default: none)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE", default=None,
                     help="constrain the output to JSON valid against the JSON schema in FILE (default: free)")
    fmt.add_argument("--regex", default=None, help="constrain the output to match this regex (default: free)")
    p.add_argument("--tools", metavar="FILE", default=None,
                   help="tools the model may call, with --chat: a JSON list (see above) (default: none)")
    p.add_argument("--tool-choice", default=None,
                   help="auto, none, required, or a tool's name (default: auto when --tools is given)")
    add_client_security_flags(p)
    args = p.parse_args(argv)
    try:
        args.security = client_security(args)
        args.fields = _fields(args)  # the files named by flags are read now: a bad one is a usage error
    except ValueError as e:  # a certificate without its key, an unreadable file: named by its flag
        print(f"qnext-generate: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
