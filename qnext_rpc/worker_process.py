"""The worker process: owns the engine (model + device) and runs the busy loop of docs/architecture.md §3.

    handshake: load the engine, send Ready (model summary + cache sizes)
    loop:      drain the inbox (blocking only when the engine has nothing to do) -> step -> send StepResult

It never waits for the server between steps. Every step's outputs go out as one message, with the pool
usage after the step, so an abort shows up as freed blocks in the very next message.
"""

from __future__ import annotations

import json
import os
import signal
import time
from multiprocessing.connection import Connection

from qnext.rpc.messages import (AddRequest, ModelSummary, PrefixCacheReset, Ready, Rejected, Shutdown, StepResult,
                                Submit, WorkerStats)
from qnext.worker.engine import Engine, EngineConfig, GenerationRequest
from qnext.worker.scheduler import RequestStatus

def run_worker(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the spawned process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop (Shutdown or pipe EOF)
    engine = Engine(config)
    try:
        conn.send(Ready(model=_summary(engine), cache=engine.cache_info, pid=os.getpid()))
        _loop(engine, conn)
    finally:
        engine.close()  # joins the other tensor-parallel ranks, if any


def _summary(engine: Engine) -> ModelSummary:
    mcfg = engine.model.config
    raw = json.loads((engine.model_dir / "config.json").read_text())
    quant = f"{mcfg.quant.method}-block-{mcfg.quant.block_size[0]}" if mcfg.quant else ""
    return ModelSummary(model_dir=str(engine.model_dir), architecture=(raw.get("architectures") or [""])[0],
                        dtype=str(engine.dtype).removeprefix("torch."), quantization=quant,
                        max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                        eos_token_ids=tuple(engine.eos_token_ids), num_mtp_layers=mcfg.num_mtp_layers,
                        spec_supported=engine.max_spec_tokens > 0, device=_device(engine),
                        cuda_graphs=engine.describe_graphs())


def _device(engine: Engine) -> str:
    tp = engine.config.tensor_parallel_size
    return str(engine.device) if tp == 1 else f"{engine.device} (tensor parallel: {tp} ranks from here)"


def _loop(engine: Engine, conn: Connection) -> None:
    unstarted: set[str] = set()
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
            _apply(engine, msg, unstarted, conn)
        if not engine.has_unfinished():
            continue
        step_start = time.monotonic()
        outputs = engine.step()
        started = _newly_started(engine, unstarted, step_start)
        conn.send(StepResult(outputs=outputs, stats=_stats(engine), started=started))


def _apply(engine: Engine, msg: Submit, unstarted: set[str], conn: Connection) -> None:
    for rid in msg.aborts:
        engine.abort(rid)
        unstarted.discard(rid)
    if msg.reset_prefix_cache:
        cm = engine.cache_manager
        checkpoints, blocks = (cm.prefix.num_checkpoints_used if cm.prefix else 0), cm.kv_blocks_cached
        engine.reset_prefix_cache()
        conn.send(PrefixCacheReset(checkpoints, blocks, _stats(engine)))
    for add in msg.adds:
        try:
            engine.add_request(_generation_request(add))
        except ValueError as e:
            conn.send(Rejected(add.request_id, str(e)))
            continue
        unstarted.add(add.request_id)


def _generation_request(add: AddRequest) -> GenerationRequest:
    return GenerationRequest(add.request_id, add.prompt_token_ids, add.sampling, add.stopping,
                             add.num_speculative_tokens, use_prefix_cache=add.use_prefix_cache,
                             cache_checkpoints=add.cache_checkpoints)


def _newly_started(engine: Engine, unstarted: set[str], step_start: float) -> dict[str, float]:
    """Requests scheduled for the first time in the step that began at step_start."""
    started = {}
    for rid in list(unstarted):
        r = engine.scheduler.get(rid)
        if r is None or r.status != RequestStatus.WAITING:
            started[rid] = step_start
            unstarted.discard(rid)
    return started


def _stats(engine: Engine) -> WorkerStats:
    cm = engine.cache_manager
    spec = engine.spec_counters
    graphs = engine.graphs.stats if engine.graphs else None
    prefix = {}
    if cm.prefix is not None:
        st = cm.prefix.stats
        prefix = dict(prefix_cache_enabled=True, prefix_cache_queries=st.num_queries, prefix_cache_hits=st.num_hits,
                      prefix_cache_query_tokens=st.query_tokens, prefix_cache_hit_tokens=st.hit_tokens,
                      checkpoints_used=cm.prefix.num_checkpoints_used, checkpoints_total=cm.prefix.num_checkpoints,
                      checkpoint_evictions=st.checkpoint_evictions, kv_blocks_cached=cm.kv_blocks_cached,
                      kv_block_evictions=st.block_evictions)
    return WorkerStats(num_running=engine.scheduler.num_running, num_waiting=engine.scheduler.num_waiting,
                       kv_blocks_used=cm.kv_blocks_used, kv_blocks_total=cm.kv_blocks_total,
                       state_slots_used=cm.state_slots_used, state_slots_total=cm.state_slots_total,
                       num_steps=engine.timings.num_steps,
                       spec_drafted_tokens=spec.num_drafted, spec_accepted_tokens=spec.num_accepted,
                       cuda_graph_steps=graphs.replayed_steps if graphs else 0,
                       cuda_graph_padded_rows=graphs.padded_rows if graphs else 0, **prefix)
