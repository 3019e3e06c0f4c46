"""The typed messages between the server process and the worker process (pickled over a spawn-context Pipe).

server -> worker: `Submit` (every arrival and abort of one event-loop tick, coalesced, and a prefix-cache reset
when asked), `Shutdown`.
worker -> server: `Ready` once (the readiness handshake), then one `StepResult` per engine step,
`Rejected` for a request the engine refused (a backstop: the server validates before submitting), and
`PrefixCacheReset` after each reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qnext.worker.engine import CacheInfo, RequestOutput
from qnext.worker.sampler import SamplingParams
from qnext.worker.scheduler import StoppingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    num_speculative_tokens: int = 0
    use_prefix_cache: bool = True
    cache_checkpoints: tuple[int, ...] = ()  # prompt offsets to keep the recurrent state at


@dataclass(frozen=True)
class Submit:
    adds: list[AddRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    reset_prefix_cache: bool = False  # drop every cached prefix after applying the aborts


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class ModelSummary:
    """What the server needs to know about the loaded model (sent in the handshake)."""

    model_dir: str
    architecture: str
    dtype: str
    quantization: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_mtp_layers: int
    spec_supported: bool  # the engine accepts a per-request num_speculative_tokens
    device: str
    cuda_graphs: str = "off"  # decode graphs: "off", or what was captured (worker/graph_runner.py)


@dataclass(frozen=True)
class Ready:
    model: ModelSummary
    cache: CacheInfo
    pid: int


@dataclass(frozen=True)
class WorkerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    state_slots_used: int = 0
    state_slots_total: int = 0
    num_steps: int = 0
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    cuda_graph_steps: int = 0  # target forwards run by a decode graph (worker/graph_runner.py)
    cuda_graph_padded_rows: int = 0  # padding sequences those steps carried (the price of bucketing)
    prefix_cache_enabled: bool = False
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    checkpoints_used: int = 0
    checkpoints_total: int = 0
    checkpoint_evictions: int = 0
    kv_blocks_cached: int = 0
    kv_block_evictions: int = 0


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]
    stats: WorkerStats
    # request_id -> time.monotonic() when the worker first saw it RUNNING (CLOCK_MONOTONIC is system-wide).
    started: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefixCacheReset:
    checkpoints_freed: int
    kv_blocks_freed: int
    stats: WorkerStats  # pool usage after the reset


@dataclass(frozen=True)
class Rejected:
    request_id: str
    message: str  # starts with the field name, like every ValueError from the engine
