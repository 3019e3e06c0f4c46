"""The typed messages between the server process and the worker process (pickled over a spawn-context Pipe).
What they carry is defined torch-free in `qnext.worker.types`.

server -> worker: `Submit` (every arrival and abort of one event-loop tick, coalesced, and a prefix-cache reset
when asked), `Shutdown`.
worker -> server: `Ready` once (the readiness handshake), then one `StepResult` per engine step,
`Rejected` for a request the engine refused (a backstop: the server validates before submitting), and
`PrefixCacheReset` after each reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qnext.worker.types import CacheInfo, EngineStats, GenerationRequest, ModelSummary, RequestOutput


@dataclass(frozen=True)
class Submit:
    adds: list[GenerationRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    sample_aborts: list[tuple[str, int]] = field(default_factory=list)  # (request id, index): one parallel sample
    reset_prefix_cache: bool = False  # drop every cached prefix after applying the aborts


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class StartFailed:
    """The engine refused its configuration (a ValueError naming the field, e.g. a --max-model-len the config or
    the cache cannot hold): a start-up error for the server to report, not a crash to restart."""

    message: str


@dataclass(frozen=True)
class Ready:
    model: ModelSummary
    cache: CacheInfo
    pid: int
    stats: EngineStats  # pool sizes and usage before the first step: GetServerStats is right from the start


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]
    stats: EngineStats
    # request_id -> time.monotonic() when the worker first saw it RUNNING (CLOCK_MONOTONIC is system-wide).
    started: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefixCacheReset:
    checkpoints_freed: int
    kv_blocks_freed: int
    stats: EngineStats  # pool usage after the reset


@dataclass(frozen=True)
class Rejected:
    request_id: str
    message: str  # starts with the field name, like every ValueError from the engine
