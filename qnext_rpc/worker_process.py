"""The worker process: owns the engine (model + device) and runs the busy loop of docs/architecture.md §3.

    handshake: load the engine, send Ready (model summary + cache sizes)
    loop:      drain the inbox (blocking only when the engine has nothing to do) -> step -> send StepResult

It never waits for the server between steps. Every step's outputs go out as one message, with the pool
usage after the step, so an abort shows up as freed blocks in the very next message. A step that raises ends
its own requests with an error (worker/step_failure.py), logged here with their ids; only a failure the engine
cannot pin on a step's requests leaves this loop, and the process, for the server to restart it.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import structlog

from qnext.rpc.logs import configure_logging_from_env
from qnext.rpc.messages import PrefixCacheReset, Ready, Rejected, Shutdown, StartFailed, StepResult, Submit
from qnext.worker.types import EngineConfig

if TYPE_CHECKING:  # the server process imports this module for run_worker's name only: no torch there
    from qnext.worker.engine import Engine

log = structlog.get_logger("qnext.worker")


def run_worker(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the spawned process."""
    from qnext.worker.engine import Engine
    from qnext.worker.fault_injection import install_from_env
    configure_logging_from_env()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop (Shutdown or pipe EOF)
    try:
        engine = Engine(config)
    except (ValueError, FileNotFoundError) as e:  # the configuration itself: restarting would fail the same way
        conn.send(StartFailed(str(e)))
        return
    if (injected := install_from_env(engine)) is not None:
        log.warning("fault injection is on (test only)", setting=injected)
    try:
        conn.send(Ready(model=engine.describe(), cache=engine.cache_info, pid=os.getpid(), stats=engine.stats()))
        _loop(engine, conn)
    finally:
        engine.close()  # joins the other tensor-parallel ranks, if any


def _loop(engine: Engine, conn: Connection) -> None:
    while True:
        if not engine.has_unfinished():
            conn.poll(None)  # idle: block until the server sends something
        while conn.poll():
            try:
                msg = conn.recv()
            except EOFError:
                return  # the server is gone
            if isinstance(msg, Shutdown):
                return
            _apply(engine, msg, conn)
        if not engine.has_unfinished():
            continue
        step_start = time.monotonic()
        outputs = engine.step()
        for failed in engine.failures.take():
            if failed.drafts_only:
                log.warning("MTP drafting failed; this step's requests go on without drafts",
                            request_ids=failed.request_ids, traceback=failed.traceback)
            elif failed.error is None:
                log.warning("engine step failed; its requests will run again one at a time to find the cause",
                            request_ids=failed.request_ids, traceback=failed.traceback)
            else:
                log.error("engine step failed; its requests end with an error, the rest keep running",
                          request_ids=failed.request_ids, out_of_memory=failed.error.out_of_memory,
                          traceback=failed.traceback)
        started = {rid: step_start for rid in engine.admitted}
        try:
            conn.send(StepResult(outputs=outputs, stats=engine.stats(), started=started))
        except (BrokenPipeError, ConnectionResetError):  # the server died (killed): nobody to serve, exit
            log.warning("the server is gone; the worker exits", running=engine.stats().num_running)
            return


def _apply(engine: Engine, msg: Submit, conn: Connection) -> None:
    for rid in msg.aborts:
        engine.abort(rid)
    for rid, index in msg.sample_aborts:
        engine.abort(rid, index)
    if msg.reset_prefix_cache:
        stats = engine.stats()
        engine.reset_prefix_cache()
        conn.send(PrefixCacheReset(stats.checkpoints_used, stats.kv_blocks_cached, engine.stats()))
    for add in msg.adds:
        try:
            engine.add_request(add)
        except ValueError as e:
            conn.send(Rejected(add.request_id, str(e)))
