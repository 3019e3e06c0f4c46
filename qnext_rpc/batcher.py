"""The asyncio side of the worker pipe (docs/architecture.md §2-§3): admission, coalesced IPC, fan-out, worker
lifecycle.

- `submit()` admits a request and queues it; every arrival and abort of one event-loop tick goes to the worker
  as one `Submit` message. A client's `request_id` is only a label: each submission gets its own key (the id the
  engine sees), so an output can only reach the handle that submitted it, and a label reused right after a
  cancel (whose final output is still on its way) cannot take over the new stream.
- The admission bound (`AdmissionError` at `max_pending_requests`) counts everything the worker holds: open
  streams and released ones whose abort the worker has not confirmed yet.
- The worker's `StepResult`s are read by a loop reader callback and appended to per-request handles; a
  handle hands over everything that arrived since it was last read, so a slow reader gets several steps'
  tokens in one stream message.
- Sends go through one thread: a blocking `send` on the loop could deadlock against a worker blocked
  sending to us.
- A dead worker (pipe EOF or process exit) fails every open handle with `WorkerUnavailable`, reports
  not-ready, and is restarted (with backoff if it keeps dying).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import structlog

from qnext.rpc.messages import PrefixCacheReset, Ready, Rejected, Shutdown, StartFailed, StepResult, Submit
from qnext.worker.types import EngineConfig, EngineStats, GenerationRequest, RequestOutput, StepError
from qnext.rpc.worker_env import worker_environment
from qnext.rpc.worker_process import run_worker

log = structlog.get_logger("qnext.batcher")


class AdmissionError(Exception):
    """Too many open requests (RESOURCE_EXHAUSTED)."""


class WorkerStartFailed(RuntimeError):
    """The engine refused its configuration at start-up (the message names the field)."""


class WorkerUnavailable(Exception):
    """The worker is down, restarting, or the server is draining (UNAVAILABLE)."""


class RequestFailed(Exception):
    """The engine step this request was part of raised (INTERNAL); the worker keeps serving the others."""

    @staticmethod
    def of(error: StepError) -> RequestFailed:
        return (RequestOutOfMemory if error.out_of_memory else RequestFailed)(error.message)


class RequestOutOfMemory(RequestFailed):
    """... by running out of memory (RESOURCE_EXHAUSTED)."""


class RequestHandle:
    def __init__(self, key: str, request_id: str, num_samples: int = 1) -> None:
        self.key = key  # unique per submission: the engine's request id
        self.request_id = request_id  # the client's label (logs, responses)
        self.arrival = time.monotonic()
        self.started: float | None = None  # when the worker first scheduled it
        self._outputs: list[RequestOutput] = []
        self._error: Exception | None = None
        self._event = asyncio.Event()
        self.num_unfinished = num_samples  # samples (GenerationRequest.n) whose final output has not come

    @property
    def finished(self) -> bool:
        """The worker sent the final output of every sample."""
        return self.num_unfinished == 0

    def _push(self, out: RequestOutput) -> None:
        self.num_unfinished -= out.finished
        if out.error is not None:  # the tokens before it are still read first (`next`)
            self._fail(RequestFailed.of(out.error))
            return
        self._outputs.append(out)
        self._event.set()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._event.set()

    async def next(self, min_tokens: int = 1) -> list[RequestOutput]:
        """Everything that arrived since the last call, once that is at least `min_tokens` new tokens, the final
        output, or an error (read after the tokens before it)."""
        while not self._ready(min_tokens):
            self._event.clear()
            await self._event.wait()
        if not self._outputs:
            raise self._error
        outputs, self._outputs = self._outputs, []
        return outputs

    def _ready(self, min_tokens: int) -> bool:
        if self._error is not None or (self._outputs and self.finished):
            return True
        return sum(len(o.new_token_ids) for o in self._outputs) >= max(min_tokens, 1)


class Batcher:
    def __init__(self, engine_config: EngineConfig, max_pending_requests: int,
                 on_ready_change: Callable[[bool], None] = lambda ready: None,
                 worker_preload: list[str] | None = None) -> None:
        """`worker_preload`: libraries the worker process gets in LD_PRELOAD (qnext_rpc/worker_env.py)."""
        self.engine_config = engine_config
        self.worker_preload = list(worker_preload or [])
        self.max_pending_requests = max_pending_requests
        self.on_ready_change = on_ready_change
        self.ready: Ready | None = None  # the latest handshake; None while the worker is down
        self.stats = EngineStats()
        self.num_restarts = 0
        self._start_failed: str | None = None  # the engine's refusal of its configuration, if it refused
        self.draining = False
        self._handles: dict[str, RequestHandle] = {}  # by key
        self._in_worker: dict[str, int] = {}  # keys submitted to the worker -> samples whose final output has not come
        self._num_submitted = 0
        self._adds: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._sample_aborts: list[tuple[str, int]] = []  # (key, index): one parallel sample of a request
        self._resets: list[asyncio.Future] = []  # ResetPrefixCache calls: sent / waiting for the worker's answer
        self._reset_pending = False  # a reset to send with the next flush
        self._flush_scheduled = False
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._sendq: queue.SimpleQueue | None = None
        self._ready_fut: asyncio.Future | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_step: Callable[[StepResult], None] = lambda result: None

    @property
    def num_pending(self) -> int:
        """Requests the server holds: open streams, and released ones the worker has not finished aborting."""
        return len(self._handles.keys() | self._in_worker.keys())

    async def start(self) -> Ready:
        self._loop = asyncio.get_running_loop()
        return await self._spawn()

    async def _spawn(self) -> Ready:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=run_worker, args=(self.engine_config, child), name="qnext-worker", daemon=True)
        with worker_environment(self.worker_preload):
            proc.start()
        child.close()  # only the worker holds that end, so its death is EOF here
        self._proc, self._conn = proc, parent
        self._sendq = queue.SimpleQueue()
        threading.Thread(target=_sender, args=(parent, self._sendq), name="qnext-ipc-send", daemon=True).start()
        self._ready_fut = self._loop.create_future()
        self._loop.add_reader(parent.fileno(), self._on_readable, parent)
        self._loop.add_reader(proc.sentinel, self._on_worker_exit, proc)
        return await self._ready_fut

    def submit(self, add: GenerationRequest) -> RequestHandle:
        """Admit `add` (its request_id is the client's label) and queue it for the worker."""
        if self.draining:
            raise WorkerUnavailable("the server is draining (shutting down); retry on another replica")
        if self.ready is None:
            raise WorkerUnavailable("the worker is not ready (starting or restarting); retry shortly")
        held = self.num_pending
        if held >= self.max_pending_requests:
            raise AdmissionError(f"server is full: {held} requests open, the limit is "
                                 f"{self.max_pending_requests} (--max-pending-requests); retry later")
        self._num_submitted += 1
        key = f"{self._num_submitted}:{add.request_id}"  # unique for this server's life; the label for logs
        handle = RequestHandle(key, add.request_id, add.n)
        self._handles[key] = handle
        self._adds.append(dataclasses.replace(add, request_id=key))
        self._schedule_flush()
        return handle

    def release(self, handle: RequestHandle) -> None:
        """The stream has ended, for any reason: forget it and free its cache in the worker if still there.
        Until the worker's final output for it arrives it still counts against the admission bound."""
        key = handle.key
        if self._handles.pop(key, None) is None:
            return  # released before (or failed with the worker)
        pending = [a for a in self._adds if a.request_id != key]
        if len(pending) != len(self._adds):
            self._adds = pending  # never reached the worker
        elif key in self._in_worker and not handle.finished:
            self._aborts.append(key)
            self._schedule_flush()

    def abort_sample(self, handle: RequestHandle, index: int) -> None:
        """Stop one parallel sample of a stream that goes on (a stop string ended it)."""
        if handle.key in self._in_worker:
            self._sample_aborts.append((handle.key, index))
            self._schedule_flush()

    async def reset_prefix_cache(self) -> PrefixCacheReset:
        """Ask the worker to drop its cached prefixes; resolves with what it freed."""
        if self.ready is None:
            raise WorkerUnavailable("the worker is not ready (starting or restarting); retry shortly")
        fut = self._loop.create_future()
        self._resets.append(fut)
        self._reset_pending = True
        self._schedule_flush()
        return await fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if (not (self._adds or self._aborts or self._sample_aborts or self._reset_pending) or self._sendq is None
                or self.ready is None):
            return
        self._in_worker.update((a.request_id, a.n) for a in self._adds)
        self._sendq.put(Submit(adds=self._adds, aborts=self._aborts, sample_aborts=self._sample_aborts,
                               reset_prefix_cache=self._reset_pending))
        self._adds, self._aborts, self._sample_aborts, self._reset_pending = [], [], [], False

    def _on_readable(self, conn: Connection) -> None:
        try:
            while conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            self._on_worker_death(conn, "the worker's pipe closed")

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, StepResult):
            self.stats = msg.stats
            for rid, t in msg.started.items():  # a request preempted and admitted again keeps its first start
                if (h := self._handles.get(rid)) is not None and h.started is None:
                    h.started = t
            for out in msg.outputs:
                if out.finished and out.request_id in self._in_worker:
                    self._in_worker[out.request_id] -= 1
                    if not self._in_worker[out.request_id]:
                        del self._in_worker[out.request_id]
                if (h := self._handles.get(out.request_id)) is not None:
                    h._push(out)
            self.on_step(msg)
        elif isinstance(msg, Ready):
            self.ready, self.stats = msg, msg.stats
            log.info("worker ready", pid=msg.pid, kv_tokens=msg.cache.num_kv_tokens, state_slots=msg.cache.num_slots,
                     preloaded=":".join(self.worker_preload) or "nothing", malloc=msg.model.host_malloc,
                     cpu_token_steps=msg.model.cpu_token_steps)
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_result(msg)
            self.on_ready_change(True)
        elif isinstance(msg, PrefixCacheReset):
            self.stats = msg.stats
            # the worker answers resets in order and one answer covers every reset sent before it
            for fut in self._resets:
                if not fut.done():
                    fut.set_result(msg)
            self._resets = []
        elif isinstance(msg, StartFailed):
            self._start_failed = msg.message  # the worker exits next; it is not restarted
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_exception(WorkerStartFailed(msg.message))
        elif isinstance(msg, Rejected):
            self._in_worker.pop(msg.request_id, None)
            if (h := self._handles.get(msg.request_id)) is not None:
                h._fail(ValueError(msg.message))

    def _on_worker_exit(self, proc: mp.process.BaseProcess) -> None:
        if proc is self._proc:
            proc.join(timeout=1)  # the sentinel fires at exit, before the exit code is collected
            self._on_worker_death(self._conn, f"the worker exited (code {proc.exitcode})")

    def _on_worker_death(self, conn: Connection | None, why: str) -> None:
        proc = self._proc
        if conn is not self._conn or proc is None:
            return  # already handled
        self._loop.remove_reader(conn.fileno())
        self._loop.remove_reader(proc.sentinel)
        self._sendq.put(None)
        conn.close()
        proc.join(timeout=1)
        self._proc = self._conn = None
        was_ready, self.ready = self.ready is not None, None
        error = WorkerUnavailable(f"the worker died ({why}); it is being restarted, retry shortly")
        for h in self._handles.values():
            h._fail(error)
        for fut in self._resets:
            if not fut.done():
                fut.set_exception(error)
        self._resets, self._reset_pending = [], False
        self._handles.clear()
        self._in_worker.clear()
        self._adds, self._aborts, self._sample_aborts = [], [], []
        self.stats = EngineStats()
        if self._ready_fut is not None and not self._ready_fut.done():
            self._ready_fut.set_exception(RuntimeError(f"the worker failed to start: {why}"))
        if self._closing:
            return
        if self._start_failed is not None:
            log.error("the worker refused its configuration; not restarting it", error=self._start_failed)
            return
        log.error("worker died", reason=why, exitcode=proc.exitcode, restarts=self.num_restarts)
        if was_ready:
            self.on_ready_change(False)
        self._loop.create_task(self._restart(was_ready))

    async def _restart(self, was_ready: bool) -> None:
        delay = 0.0 if was_ready else min(30.0, 2.0 ** min(self.num_restarts, 5))
        await asyncio.sleep(delay)
        if self._closing:
            return
        self.num_restarts += 1
        try:
            await self._spawn()
        except RuntimeError as e:
            log.error("worker restart failed", error=str(e))

    def fail_open(self, error: Exception) -> None:
        """End every open stream with `error` (its handler answers it and releases the request)."""
        for h in self._handles.values():
            h._fail(error)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is open (draining); False when the timeout passed first."""
        deadline = time.monotonic() + timeout
        while self._handles and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._handles

    async def close(self) -> None:
        """Stop the worker (Shutdown, then terminate if it does not exit within 5 s)."""
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        for h in self._handles.values():
            h._fail(WorkerUnavailable("the server is shutting down"))
        self._sendq.put(Shutdown())
        for _ in range(50):
            if not proc.is_alive():
                break
            await asyncio.sleep(0.1)
        if proc.is_alive():
            proc.terminate()
        if self._conn is not None:  # the exit may already have been seen by the reader
            self._on_worker_death(self._conn, "shut down")


def _sender(conn: Connection, q: queue.SimpleQueue) -> None:
    """Ships queued messages to the worker in order; None ends the thread."""
    while (msg := q.get()) is not None:
        try:
            conn.send(msg)
        except (OSError, ValueError):
            return  # the worker is gone; the reader side notices and restarts it
