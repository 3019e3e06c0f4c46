"""Everything that crosses the process boundary, and the engine's options: plain dataclasses, no torch.

The server process (qnext.rpc) imports this module and never the engine's: it builds `GenerationRequest`s and
reads back `RequestOutput`s, `EngineStats` and `ModelSummary`, all picklable without torch. Every value is
checked where it is defined, once: a bad one raises ValueError whose message starts with the field's name (the
gRPC service passes it on as INVALID_ARGUMENT, the command lines as a usage error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

MAX_TOP_LOGPROBS = 20
# Temperatures below this are treated as greedy (as vLLM does): logits / 1e-30 overflows to inf and NaNs.
GREEDY_TEMPERATURE = 1e-5
# Activation dtypes by name; "auto" = the checkpoint's dtype where the device computes it, else float32.
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
STATE_DTYPES = ("float32", "bfloat16", "float64")  # DeltaNet recurrent state
# Decode steps as CUDA graphs: auto (on CUDA with the Triton kernels, one device), off (vLLM's --enforce-eager),
# padded-eager (the graphs' static buffers without capture: CPU tests, bisecting a capture problem).
CUDA_GRAPH_MODES = ("auto", "off", "padded-eager")
MAX_SPECULATIVE_TOKENS = 4


def require(ok: bool, name: str, message: str) -> None:
    """ValueError("name: message") unless ok."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def require_number(name: str, value: object, integer: bool, ok: Callable[[float], bool], rule: str) -> None:
    """`value` is an int (integer) or a finite number (otherwise), and ok(value); bools are neither."""
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    require(not isinstance(value, bool) and kind_ok and (integer or math.isfinite(value)), name,
            f"must be {'an int' if integer else 'a finite number'}, got {value!r}")
    require(ok(value), name, f"must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy (argmax of processed logits; penalties still apply)
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 => off
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # > 0, over prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2], over output tokens
    frequency_penalty: float = 0.0  # [-2, 2], over output tokens
    seed: int | None = None  # same seed => same tokens regardless of batch composition
    top_logprobs: int = 0  # 0..MAX_TOP_LOGPROBS alternatives to return

    def __post_init__(self) -> None:
        require_number("temperature", self.temperature, False, lambda x: x >= 0, ">= 0")
        require_number("top_p", self.top_p, False, lambda x: 0 < x <= 1, "in (0, 1]")
        require_number("top_k", self.top_k, True, lambda x: x >= 0, ">= 0 (0 disables it)")
        require_number("min_p", self.min_p, False, lambda x: 0 <= x <= 1, "in [0, 1]")
        require_number("repetition_penalty", self.repetition_penalty, False, lambda x: x > 0, "> 0")
        require_number("presence_penalty", self.presence_penalty, False, lambda x: -2 <= x <= 2, "in [-2, 2]")
        require_number("frequency_penalty", self.frequency_penalty, False, lambda x: -2 <= x <= 2, "in [-2, 2]")
        if self.seed is not None:
            require_number("seed", self.seed, True, lambda x: -(2**63) <= x < 2**64, "in [-2**63, 2**64)")
        require_number("top_logprobs", self.top_logprobs, True, lambda x: 0 <= x <= MAX_TOP_LOGPROBS,
                       f"in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # eos and stop ids are suppressed (and do not stop) for the first min_new_tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                f"token ids must be >= 0, got {list(self.stop_token_ids)}")


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the embedded tiny default
    device: str = "cpu"
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    block_size: int = 16
    # Cache budget: a fraction of device memory on CUDA (<= 1), bytes on CPU (> 1).
    cache_memory: float = 0.0  # 0 = default: 0.85 of free memory on CUDA, 512 MiB on CPU
    state_dtype: str = "float32"  # DeltaNet recurrent state; bfloat16 halves it
    seed: int | None = None  # seeds the per-request seeds drawn for requests that give none
    # MTP speculative decoding: the server's maximum (and default) draft length; 0 = off. Needs mtp.* weights.
    num_speculative_tokens: int = 0
    # Prefix caching (worker/prefix_cache.py): KV blocks + DeltaNet state checkpoints of earlier prompts.
    enable_prefix_caching: bool = True
    num_checkpoints: int = 0  # state checkpoints kept; 0 = as many as 10% of the cache budget holds
    # Tensor parallelism: ranks (processes, one device each) the model is split across (worker/parallel.py).
    tensor_parallel_size: int = 1
    # Decode steps as CUDA graphs (worker/graph_runner.py), one of CUDA_GRAPH_MODES.
    cuda_graphs: str = "auto"
    cuda_graph_max_batch_size: int = 256  # largest captured batch (capped by max_num_seqs)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size",
                     "cuda_graph_max_batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.dtype in DTYPES, "dtype", f"must be {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.state_dtype in STATE_DTYPES, "state_dtype",
                f"must be float32 or bfloat16, got {self.state_dtype!r}")
        require(0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS, "num_speculative_tokens",
                f"must be in [0, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}")
        require(self.cache_memory >= 0, "cache_memory", f"must be >= 0, got {self.cache_memory}")
        require(self.cuda_graphs in CUDA_GRAPH_MODES, "cuda_graphs",
                f"must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graphs!r}")
        require(self.num_checkpoints >= 0, "num_checkpoints", f"must be >= 0, got {self.num_checkpoints}")
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                f"must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    num_speculative_tokens: int | None = None  # None = the engine's default; 0 = off; <= the engine's maximum
    use_prefix_cache: bool = True  # False: this request neither reads nor fills the prefix cache
    # Prompt positions (1..len(prompt)) where a DeltaNet state checkpoint should be taken, so a later prompt
    # sharing exactly that prefix can start there (chat-turn boundaries, client-chosen offsets).
    cache_checkpoints: tuple[int, ...] = ()


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float]  # of each new token
    top_logprobs: list[list[tuple[int, float]]]  # per new token, the request's top-n (id, logprob)
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    num_drafted_tokens: int = 0  # MTP drafts verified for this request so far
    num_accepted_tokens: int = 0  # of which accepted
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class Completion:
    """One prompt's result from `Engine.generate`."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None
    num_prompt_tokens: int


@dataclass(frozen=True)
class CacheInfo:
    num_blocks: int
    block_size: int
    num_slots: int
    bytes_per_block: int
    bytes_per_slot: int
    num_checkpoints: int = 0  # prefix-cache state checkpoints (0 = prefix caching off)
    bytes_per_checkpoint: int = 0

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class ModelSummary:
    """What the server needs to know about the loaded model (`Engine.describe()`)."""

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
    cuda_graphs: str = "off"  # decode graphs: "off (why)", or what was captured (worker/graph_runner.py)


@dataclass(frozen=True)
class EngineStats:
    """Load, pool usage and lifetime counters after a step (`Engine.stats()`)."""

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
