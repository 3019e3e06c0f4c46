"""The engine described in torch-free values for the server: what is served (`ModelSummary`) and how loaded it
is (`EngineStats`), read from the runner, the scheduler and the cache manager in one place."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from qnext.worker.types import EngineStats, ModelSummary

if TYPE_CHECKING:
    from qnext.worker.engine import Engine


def model_summary(engine: Engine) -> ModelSummary:
    runner = engine.runner
    mcfg = runner.model.config
    architecture = "Qwen3NextForCausalLM"
    if runner.model_dir is not None:
        raw = json.loads((runner.model_dir / "config.json").read_text())
        architecture = (raw.get("architectures") or [""])[0]
    quant = f"{mcfg.quant.method}-block-{mcfg.quant.block_size[0]}" if mcfg.quant else ""
    tp = engine.config.tensor_parallel_size
    device = str(runner.device) if tp == 1 else f"{runner.device} (tensor parallel: {tp} ranks from here)"
    return ModelSummary(model_dir=str(runner.model_dir) if runner.model_dir is not None else "(built in memory)",
                        architecture=architecture, dtype=str(runner.dtype).removeprefix("torch."),
                        quantization=quant, max_model_len=runner.max_model_len, vocab_size=runner.vocab_size,
                        eos_token_ids=tuple(runner.eos_token_ids), num_mtp_layers=mcfg.num_mtp_layers,
                        spec_supported=runner.max_spec_tokens > 0, device=device,
                        cuda_graphs=runner.describe_graphs(), dtype_reason=runner.dtype_reason,
                        host_malloc=runner.host_malloc, cpu_token_steps=runner.cpu_token_steps,
                        kv_cache_dtype=str(runner.kv_dtype).removeprefix("torch."),
                        state_dtype=engine.config.state_dtype)


def engine_stats(engine: Engine) -> EngineStats:
    cm, spec, graphs = engine.cache_manager, engine.spec.counters, engine.runner.graphs
    prefix = {}
    if cm.prefix is not None:
        st = cm.prefix.stats
        prefix = dict(prefix_cache_enabled=True, prefix_cache_queries=st.num_queries, prefix_cache_hits=st.num_hits,
                      prefix_cache_query_tokens=st.query_tokens, prefix_cache_hit_tokens=st.hit_tokens,
                      checkpoints_used=cm.prefix.num_checkpoints_used, checkpoints_total=cm.prefix.num_checkpoints,
                      checkpoint_evictions=st.checkpoint_evictions, kv_blocks_cached=cm.kv_blocks_cached,
                      kv_block_evictions=st.block_evictions)
    return EngineStats(num_running=engine.scheduler.num_running, num_waiting=engine.scheduler.num_waiting,
                       kv_blocks_used=cm.kv_blocks_used, kv_blocks_total=cm.kv_blocks_total,
                       state_slots_used=cm.state_slots_used, state_slots_total=cm.state_slots_total,
                       num_steps=engine.runner.timings.num_steps,
                       num_prompt_tokens_computed=engine.scheduler.num_prompt_tokens_computed,
                       spec_drafted_tokens=spec.num_drafted, spec_accepted_tokens=spec.num_accepted,
                       spec_draft_steps=spec.num_draft_steps, spec_draft_length=engine.spec.policy.mean_last_length,
                       cuda_graph_steps=graphs.stats.replayed_steps if graphs else 0,
                       cuda_graph_padded_rows=graphs.stats.padded_rows if graphs else 0, **prefix)
