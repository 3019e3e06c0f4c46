"""Everything that crosses the process boundary, and the engine's options: plain dataclasses, no torch.

The server process (qnext.rpc) imports this module and never the engine's: it builds `GenerationRequest`s and
reads back `RequestOutput`s, `EngineStats` and `ModelSummary`, all picklable without torch. Every value is
checked where it is defined, once: a bad one raises ValueError whose message starts with the field's name (the
gRPC service passes it on as INVALID_ARGUMENT, the command lines as a usage error).
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from typing import Any

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (token id -> bias)
MAX_STOP_TOKEN_IDS = 1024  # ids in one request's stop_token_ids
MAX_ABS_LOGIT_BIAS = 100.0  # as OpenAI's API: +100 all but forces a token, -100 all but bans it
MAX_SAMPLES = 16  # GenerationRequest.n: parallel samples of one prompt
# The engine's id of sample i > 0 of request R is R + SAMPLE_SEP + str(i); request ids must not contain it.
SAMPLE_SEP = "\x1f"
# Temperatures below this are treated as greedy (as vLLM does): logits / 1e-30 overflows to inf and NaNs.
GREEDY_TEMPERATURE = 1e-5
# Activation dtypes by name; "auto" = the checkpoint's dtype where the device computes it, else float32.
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
STATE_DTYPES = ("float32", "bfloat16", "float64")  # DeltaNet recurrent state
# Attention KV cache: auto = the activation dtype; fp8 = float8_e4m3fn with a float32 scale per token per KV head
KV_CACHE_DTYPES = ("auto", "fp8")
# Decode steps as CUDA graphs: auto (on CUDA with the Triton kernels, one device), off (vLLM's --enforce-eager),
# padded-eager (the graphs' static buffers without capture: CPU tests, bisecting a capture problem).
CUDA_GRAPH_MODES = ("auto", "off", "padded-eager")
MAX_SPECULATIVE_TOKENS = 4
SPEC_DRAFT_LENGTHS = ("adaptive", "fixed")  # how many MTP drafts per step (worker/spec_policy.py)
DRAFT_HEADS = ("auto", "full")  # the LM head MTP drafts are drawn from (worker/draft_head.py)


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
    # (token id, bias) pairs added to those logits after the penalties; ids unique (the engine checks them
    # against the vocabulary)
    logit_bias: tuple[tuple[int, float], ...] = ()

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
        require(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
                f"{len(self.logit_bias)} entries is over the limit of {MAX_LOGIT_BIAS}")
        for pair in self.logit_bias:
            require(isinstance(pair, tuple) and len(pair) == 2, "logit_bias",
                    f"entries are (token id, bias), got {pair!r}")
            require_number("logit_bias", pair[0], True, lambda x: x >= 0, ">= 0 (a token id)")
            require_number(f"logit_bias[{pair[0]}]", pair[1], False, lambda x: abs(x) <= MAX_ABS_LOGIT_BIAS,
                           f"in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]")
        ids = [t for t, _ in self.logit_bias]
        require(len(set(ids)) == len(ids), "logit_bias", "token ids must be unique")

    @cached_property
    def logit_bias_arrays(self) -> tuple[Any, Any]:
        """logit_bias as (ids int64, biases float32) numpy arrays, made once per request: building them from the
        pairs on every step cost 3.6 ms per step for 16 requests of 1,024 entries (16 ms for 64)."""
        import numpy as np  # the worker's sampler reads these; the server never does
        return (np.fromiter((t for t, _ in self.logit_bias), dtype=np.int64, count=len(self.logit_bias)),
                np.fromiter((b for _, b in self.logit_bias), dtype=np.float32, count=len(self.logit_bias)))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_filter(self) -> bool:
        """top-k, top-p or min-p cut the distribution: the sampler draws such a row by a race, others by the
        inverse CDF (worker/sampler.py, step 10)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0

    @property
    def has_penalty(self) -> bool:
        """A repetition, frequency or presence penalty: the sampler reads the request's token history."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # eos and stop ids are suppressed (and do not stop) for the first min_new_tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Reasoning budget, for a prompt that opened a think block: the token after this many generated tokens is
    # forced to `reasoning_end_id` (`</think>`) unless the output already closed the block (Request.forced_token_id).
    max_reasoning_tokens: int | None = None
    reasoning_end_id: int | None = None

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require((self.max_reasoning_tokens is None) == (self.reasoning_end_id is None), "max_reasoning_tokens",
                "needs reasoning_end_id (the </think> id), and only with it")
        require(self.max_reasoning_tokens is None or self.max_reasoning_tokens >= 0, "max_reasoning_tokens",
                f"must be >= 0, got {self.max_reasoning_tokens}")
        require(self.reasoning_end_id is None or self.reasoning_end_id >= 0, "reasoning_end_id",
                f"must be >= 0, got {self.reasoning_end_id}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        require(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
                f"{len(self.stop_token_ids)} ids is over the limit of {MAX_STOP_TOKEN_IDS}")
        bad = [t for t in self.stop_token_ids if t < 0]
        require(not bad, "stop_token_ids", f"token ids must be >= 0, got {bad[:5]}")

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """stop_token_ids as a set: every generated token is looked up in it."""
        return frozenset(self.stop_token_ids)


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"
    ERROR = "error"  # a step the request was part of failed; RequestOutput.error says how


@dataclass(frozen=True)
class StepError:
    """Why a request ended with FinishReason.ERROR: the engine step it was in raised."""

    out_of_memory: bool  # the device (or host) ran out of memory: the server answers RESOURCE_EXHAUSTED
    message: str  # for the client: the exception's type, no internals


def option(default: Any, help: str, **flag: Any) -> Any:
    """An EngineConfig field with its command-line flag (worker/engine_flags.py builds qnext-serve's, -batch's
    and -validate's from these): `help` as --help shows it ("(default: X)" is appended there, from the field's
    default), and only where the field does not imply them: the flag's name (`flag="--enforce-eager"`; else the
    field's name with dashes), argparse's action / const, choices. The type is the field's annotation."""
    return field(default=default, metadata={"help": help, **flag})


def _json_object(name: str, value: str | None, allow_null: bool = False) -> dict[str, Any] | None:
    """A flag's JSON text as a dict (None when the flag is unset, or JSON null where allowed)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise ValueError(f"{name}: not valid JSON ({e}): {value!r}") from None
    require(isinstance(parsed, dict) or (allow_null and parsed is None), name,
            f"must be a JSON object{' or null' if allow_null else ''}, got {value!r}")
    return parsed


@dataclass(frozen=True)
class EngineConfig:
    """The engine's options, each with its command-line flag: the one place they are defined, defaulted,
    described and checked (a bad value raises ValueError naming the field; the command lines name the flag)."""

    model: str | None = option(None, "checkpoint directory (default: the embedded tiny checkpoint)")
    device: str = option("cpu", "torch device, e.g. cuda:0")
    dtype: str = option("auto", "weights and activations; auto = the checkpoint's dtype where the device "
                              "computes it natively (CUDA; CPUs with AVX512-BF16/AMX), else float32", choices=DTYPES)
    max_num_seqs: int = option(64, "sequences running at once")
    max_num_batched_tokens: int = option(2048, "tokens per engine step")
    max_model_len: int | None = option(
        None, "prompt + output tokens per request; at most what the config supports (max_position_embeddings, or "
              "with YaRN factor x original_max_position_embeddings) and what the KV cache holds (default: the "
              "config's length, capped by the cache)")
    rope_scaling: str | None = option(
        None, "JSON object replacing the checkpoint's rope_scaling, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0, "
              "\"original_max_position_embeddings\": 262144}' (the model card's 1M-token setting); the checkpoint "
              "is not modified")
    hf_overrides: str | None = option(
        None, "JSON object of config.json fields to override (top-level keys), as vLLM's flag; the checkpoint is "
              "not modified")
    block_size: int = option(16, "tokens per KV-cache block")
    cache_memory: float = option(
        0.0, "KV + state cache budget: fraction of device memory (CUDA, <= 1) or bytes (CPU); 0 = 0.85 of free "
             "memory on CUDA, 512 MiB on CPU")
    state_dtype: str = option("float32", "DeltaNet recurrent state; bfloat16 halves its memory", choices=STATE_DTYPES)
    kv_cache_dtype: str = option(
        "auto", "attention KV cache; auto = the activation dtype; fp8 = float8_e4m3fn with a float32 scale per token "
                "and KV head, set when the token is written: about half the bytes of bf16, so ~2x the KV tokens",
        choices=KV_CACHE_DTYPES)
    seed: int | None = option(
        None, "seeds the seeds of requests that give none (default: a random seed per start)")
    num_speculative_tokens: int = option(
        0, f"MTP speculative decoding: draft tokens per step (0-{MAX_SPECULATIVE_TOKENS}; 0 = off), the default "
           "and maximum for every request, which may ask for fewer; needs a checkpoint with mtp.* weights")
    speculative_draft_length: str = option(
        "adaptive", "adaptive: each step, each request drafts as many tokens (up to its num_speculative_tokens) as "
                    "pay at the measured acceptance and step costs, 0 when none do (docs/speculation.md); fixed: "
                    "always its num_speculative_tokens", choices=SPEC_DRAFT_LENGTHS)
    speculative_draft_head: str = option(
        "auto", "LM head the MTP drafts are drawn from; auto = an int8 copy of the LM head (one scale per vocabulary "
                "row) for one-row draft passes on a CPU with bf16/fp16 weights, where it is faster "
                "(worker/draft_head.py), else the model's own; full = always the model's own. Outputs are the same "
                "either way (the target verifies with its full head): only the acceptance rate may move",
        choices=DRAFT_HEADS)
    # prefix caching: worker/prefix_cache.py; tensor parallelism: worker/parallel.py
    enable_prefix_caching: bool = option(
        True, "turn the prefix cache (KV blocks + recurrent-state checkpoints of earlier prompts) off",
        flag="--no-prefix-caching", action="store_false")
    num_checkpoints: int = option(
        0, "recurrent-state checkpoints the prefix cache keeps; 0 = as many as 10% of the cache budget holds")
    tensor_parallel_size: int = option(
        1, "split the model across this many devices (one process each; --device names the first); must divide "
           "the attention and DeltaNet key heads")
    # decode steps as CUDA graphs (worker/graph_runner.py): one of CUDA_GRAPH_MODES, of which the command lines
    # reach auto and off (padded-eager is for tests)
    cuda_graphs: str = option(
        "auto", "no CUDA graphs: every decode step launches its kernels one by one (as vLLM's flag)",
        flag="--enforce-eager", action="store_const", const="off")
    cuda_graph_max_batch_size: int = option(
        256, "largest decode batch captured as a CUDA graph (capped by --max-num-seqs); larger steps run eagerly")
    # on a CPU shared with other busy processes, intra-op threads that outnumber the free cores wait on each other
    # at every op (measured, 2-core box, a neighbour busy on one core: 248 tok/s with 2 threads, 645 with 1)
    cpu_threads: int = option(
        0, "torch intra-op threads of the engine on a CPU; 0 = torch's default (one per core); fewer when the "
           "machine is shared with busy processes")

    def config_overrides(self) -> dict[str, Any]:
        """config.json fields to override: --hf-overrides, then --rope-scaling on top ({} when neither)."""
        overrides = dict(_json_object("hf_overrides", self.hf_overrides) or {})
        if self.rope_scaling is not None:
            overrides["rope_scaling"] = _json_object("rope_scaling", self.rope_scaling, allow_null=True)
        return overrides

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size",
                     "cuda_graph_max_batch_size"):
            require_number(name, getattr(self, name), True, lambda x: x >= 1, ">= 1")
        require_number("cpu_threads", self.cpu_threads, True, lambda x: x >= 0, ">= 0")
        if self.max_model_len is not None:
            require_number("max_model_len", self.max_model_len, True, lambda x: x >= 1, ">= 1")
        self.config_overrides()  # a malformed JSON value fails here, naming the field
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.speculative_draft_length in SPEC_DRAFT_LENGTHS, "speculative_draft_length",
                f"must be one of {', '.join(SPEC_DRAFT_LENGTHS)}, got {self.speculative_draft_length!r}")
        require(self.speculative_draft_head in DRAFT_HEADS, "speculative_draft_head",
                f"must be one of {', '.join(DRAFT_HEADS)}, got {self.speculative_draft_head!r}")
        require(self.state_dtype in STATE_DTYPES, "state_dtype",
                f"must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        require_number("cache_memory", self.cache_memory, False, lambda x: x >= 0, ">= 0")
        if self.seed is not None:
            require_number("seed", self.seed, True, lambda x: True, "an int")
        require_number("num_speculative_tokens", self.num_speculative_tokens, True,
                       lambda x: 0 <= x <= MAX_SPECULATIVE_TOKENS, f"in [0, {MAX_SPECULATIVE_TOKENS}]")
        require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                f"must be a bool, got {self.enable_prefix_caching!r}")
        require_number("num_checkpoints", self.num_checkpoints, True, lambda x: x >= 0, ">= 0")
        require(self.cuda_graphs in CUDA_GRAPH_MODES, "cuda_graphs",
                f"must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graphs!r}")


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
    # Constrained decoding (worker/grammar.py): llguidance grammar text the output must follow (the server compiles
    # and checks it), and the token after which it starts (`</think>` when the prompt opened a think block).
    grammar: str | None = None
    grammar_starts_after: int | None = None
    priority: int = 0  # lower = sooner (worker/scheduler.py); all equal = FCFS
    # Log-probs of the prompt's tokens (each given the ones before it) with this many alternatives; None = off.
    # Such a request computes its whole prompt: it neither reads nor fills the prefix cache.
    prompt_logprobs: int | None = None
    # Parallel samples (1..MAX_SAMPLES): the prompt is computed once and its KV and DeltaNet state forked into n
    # sequences; sample i draws with seed + i (mod 2**64), so it equals a request with that seed run alone.
    n: int = 1


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
    num_draft_steps: int = 0  # decode steps in which the adaptive policy chose its draft length (0 included)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: StepError | None = None  # set with FinishReason.ERROR
    index: int = 0  # which of the request's n samples this is
    # with the first new tokens of a request that asked for prompt_logprobs: one entry per prompt token after the
    # first, (log-prob of that token, its top alternatives as (id, log-prob)); None otherwise
    prompt_logprobs: LogprobEntries | None = None


@dataclass
class LogprobEntries:
    """Log-probs of a run of tokens and each one's k most likely alternatives, in three flat arrays: a prompt's
    tokens 1.. (entry i scores prompt token i + 1 under the model given the tokens before it), and the server's
    record of a GenerateUnary sample's tokens (qnext_rpc/unary.py). Compact because a prompt's crosses the pipe
    whole and the server reads it on its event loop: as Python tuples a 16K-token prompt's entries at 20
    alternatives took 0.2 s to unpickle there (arrays pickle as bytes), and a generated token's entry with 20
    alternatives took ~2.9 KB as Python objects against 252 bytes here. Reads as a sequence of
    (log-prob, [(id, log-prob), ...]) entries; `extend` and `append` add in place."""

    k: int  # alternatives per entry
    logprobs: array = field(default_factory=lambda: array("f"))  # [n] float32
    top_ids: array = field(default_factory=lambda: array("q"))  # [n * k] int64, each entry's ids descending
    top_logprobs: array = field(default_factory=lambda: array("f"))  # [n * k] float32

    def extend(self, logprobs: bytes, top_ids: bytes, top_logprobs: bytes) -> None:
        """Append entries given as the raw bytes of float32 [m], int64 [m, k] and float32 [m, k] arrays."""
        self.logprobs.frombytes(logprobs)
        self.top_ids.frombytes(top_ids)
        self.top_logprobs.frombytes(top_logprobs)

    def append(self, logprob: float, top: Sequence[tuple[int, float]]) -> None:
        """Add one entry: a token's log-prob and its k alternatives as (id, log-prob) pairs."""
        assert len(top) == self.k, f"{len(top)} alternatives in an entry of {self.k}"
        self.logprobs.append(logprob)
        for token_id, lp in top:
            self.top_ids.append(token_id)
            self.top_logprobs.append(lp)

    def __len__(self) -> int:
        return len(self.logprobs)

    def part(self, start: int, stop: int) -> LogprobEntries:
        """Entries start..stop-1 (a copy)."""
        k = self.k
        return LogprobEntries(k, self.logprobs[start:stop], self.top_ids[start * k:stop * k],
                              self.top_logprobs[start * k:stop * k])

    def __getitem__(self, i: int) -> tuple[float, list[tuple[int, float]]]:
        k = self.k
        i = range(len(self))[i]
        return self.logprobs[i], list(zip(self.top_ids[i * k:(i + 1) * k], self.top_logprobs[i * k:(i + 1) * k]))

    def __iter__(self) -> Iterator[tuple[float, list[tuple[int, float]]]]:
        return (self[i] for i in range(len(self)))


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
    dtype_reason: str = ""  # why this dtype (worker/dtype_choice.py), for the start-up line
    kv_cache_dtype: str = ""  # KV cache storage (--kv-cache-dtype): the activation dtype or float8_e4m3fn
    state_dtype: str = ""  # DeltaNet recurrent state (--state-dtype)
    host_malloc: str = ""  # how host memory is allocated (worker/host_malloc.py), for the logs
    cpu_token_steps: str = ""  # whether kernels/cpu's C library runs (decode / verify steps, norms, ...), for the logs


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
    num_prompt_tokens_computed: int = 0  # prefill work: prompt tokens computed (cache hits and forks compute none)
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_draft_steps: int = 0  # decode steps of speculating requests (drafted / this = mean draft length)
    spec_draft_length: float = 0.0  # mean draft length the policy chose at the last step
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
