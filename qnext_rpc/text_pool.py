"""Text work (tokenising, chat rendering, detokenising, building large responses) kept off the event loop.

A large input runs on a small thread pool: HF tokenizers' encode_batch_fast and decode release the GIL while
they work, and the Python parts (chat rendering, id -> token strings) give it up at every switch interval, so
the loop keeps serving every other stream and health check meanwhile. A small input runs inline: see
INLINE_MAX. The size limits (validate.py) are checked inline before anything is handed to the pool, so a
refused request costs no work.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from qnext.rpc.text import TextProcessor
from qnext.rpc.validate import GenerateSpec, Limits, PreparedRequest, input_size, prepare

T = TypeVar("T")

# Inputs of at most this many characters (or ids to decode) run inline. Measured on a 2-core dev box: 4096
# characters tokenise in ~1.5 ms and 4096 ids decode in ~0.5 ms, a stall of the loop no longer than a GIL switch
# interval (5 ms); a hop through the pool costs ~0.1-0.3 ms of latency and a thread wake-up, which most requests
# (short prompts) would pay for nothing.
INLINE_MAX = 4096
# Small: each request's text work is bounded by the limits, and more threads would only compete for the cores
# with the loop and the worker process.
POOL_THREADS = min(4, os.cpu_count() or 1)

_pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="qnext-text")


async def run_text_work(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args): inline when size (characters or ids) is at most INLINE_MAX, else on the pool."""
    if size <= INLINE_MAX:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args))


async def prepare_off_loop(spec: GenerateSpec, limits: Limits, text: TextProcessor) -> PreparedRequest:
    """validate.prepare, with the input's size checked inline first and the tokenising on the pool when large.
    A request that may compile a grammar (response_format, tools) always goes to the pool: a large JSON schema
    takes tens of milliseconds to compile and check, too long a stall for the loop."""
    size = input_size(spec, limits)
    if spec.response_format is not None or spec.tools:
        size = INLINE_MAX + 1
    return await run_text_work(size, prepare, spec, limits, text)
