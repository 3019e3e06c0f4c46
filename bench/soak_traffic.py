"""The soak's client side (bench/soak.py): one `Traffic` per run, shared by every client loop, and what each
action sent and got back.

Actions, drawn per loop iteration with the weights in ACTIONS:
  normal    a Generate stream (token ids / text / chat, greedy or sampled, sometimes stop strings) read to the
            end; some go through GenerateUnary, Tokenize or Detokenize instead
  cancel    close the stream after k chunks (k = 0: right after the request went out)
  deadline  a timeout of 0.05-2 s on a longer generation
  bad       an invalid field value, undecodable bytes through a raw channel, or text just over the size limit
  reused    2-3 greedy streams at once under one request id from a small shared pool (one of them right after a
            cancelled stream with that id), each compared with its prompt's fresh greedy run from the start of
            the run; `control` is the same with unique ids, so a mismatch there means batch numerics, not ids
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from qnext.rpc import convert
from qnext.rpc.client import Client

ACTIONS = {"normal": 40, "cancel": 14, "deadline": 10, "bad": 14, "reused": 14, "control": 8}
SHARED_IDS = ("soak-shared-0", "soak-shared-1", "soak-shared-2")  # few, so clients collide on them
GREEDY = {"temperature": 0.0, "ignore_eos": True}
BASELINE_TOKENS = 12
_WORDS = ("the", "quick", "brown", "fox", "cache", "token", "stream", "server", "worker", "soak", "é", "日本")
_STOPS = (" ", "e", "the", "\n", "ab", "ー")
_SERVER_FAULT = ("UNKNOWN", "INTERNAL")  # what no input, however bad, should get


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so its contents need not be valid."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@dataclass
class Tally:
    """Everything the clients saw; one per run (asyncio: no locks needed)."""

    by_method: dict[str, Counter] = field(default_factory=dict)  # method -> status code -> count
    by_action: dict[str, Counter] = field(default_factory=dict)  # action[/kind] -> status code -> count
    requests_ok: int = 0  # finished generation requests (OK)
    tokens: int = 0  # generated tokens received, any outcome
    compared: Counter = field(default_factory=Counter)  # reused / control -> streams compared
    mismatches: Counter = field(default_factory=Counter)  # reused / control -> streams != their baseline
    mismatch_examples: list[dict[str, Any]] = field(default_factory=list)
    bad_unexpected: Counter = field(default_factory=Counter)  # "kind code" of bad inputs not INVALID_ARGUMENT
    bad_examples: dict[str, str] = field(default_factory=dict)
    client_errors: Counter = field(default_factory=Counter)  # "action: exception" the harness itself raised

    def count(self, method: str, action: str, code: str) -> None:
        self.by_method.setdefault(method, Counter())[code] += 1
        self.by_action.setdefault(action, Counter())[code] += 1


def code_of(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else f"client error {type(e).__name__}"


class Traffic:
    def __init__(self, target: str, info: Any, baselines: list[tuple[list[int], list[int]]], seed: int) -> None:
        self.client = Client(target)
        self.info = info
        self.baselines = baselines  # (prompt ids, greedy tokens) recorded before the chaos started
        self.tally = Tally()
        self.seed = seed
        self._eos = set(info.eos_token_ids)
        self._bad = self._bad_requests()
        # The Client's own channel (same credentials / API key as every other call), with an identity serializer
        # so any bytes go out as they are.
        self._raw = self.client._channel.unary_stream(f"/{convert.SERVICE_NAME}/Generate",
                                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)

    async def close(self) -> None:
        await self.client.close()

    # -- prompts ------------------------------------------------------------------------------------------

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            t = rng.randrange(self.info.vocab_size)
            if t not in self._eos:
                ids.append(t)
        return ids

    def _prompt(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(("ids", "text", "chat") if self.info.has_chat_template else ("ids", "text"))
        if kind == "ids":
            return {"token_ids": self.random_ids(rng, rng.randint(1, 256))}
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 120)))
        if kind == "text":
            return {"text": text}
        turns = [("system", "Be brief.")] if rng.random() < 0.3 else []
        return {"chat": [*turns, ("user", text)]}

    def _sampling(self, rng: random.Random, max_new_tokens: int | None = None) -> dict[str, Any]:
        """`max_new_tokens`: the action's own (else 1-32), drawn before the extras, whose min_new_tokens must not
        exceed it (an override after them made a few cancels INVALID_ARGUMENT)."""
        f: dict[str, Any] = {"max_new_tokens": max_new_tokens or rng.randint(1, 32)}
        if rng.random() < 0.3:
            f["temperature"] = 0.0
        else:
            f.update(temperature=rng.uniform(0.1, 1.5), top_p=rng.uniform(0.3, 1.0))
            if rng.random() < 0.5:
                f["seed"] = rng.randrange(2**32)
        if rng.random() < 0.25:
            f["stop_strings"] = rng.sample(_STOPS, rng.randint(1, 2))
        if rng.random() < 0.4:
            f.update(self._extras(rng, f["max_new_tokens"]))
        return f

    def _extras(self, rng: random.Random, max_new: int) -> dict[str, Any]:
        """One or two of the request's other features, so the chaos reaches their paths too: parallel samples,
        log-probs, per-request draft lengths, the other filters and penalties, constrained output, the prefix
        cache's opt-out."""
        info = self.info
        choices = {
            "n": lambda: {"n": rng.randint(2, 4)},
            "top_logprobs": lambda: {"top_logprobs": rng.randint(1, max(1, min(5, info.max_top_logprobs)))},
            "prompt_logprobs": lambda: {"prompt_logprobs": rng.randint(0, 2)},
            "spec": lambda: {"num_speculative_tokens": rng.randint(0, info.max_num_speculative_tokens)},
            "filters": lambda: {"top_k": rng.randint(1, 50), "min_p": rng.uniform(0.0, 0.2)},
            "penalties": lambda: {"presence_penalty": rng.uniform(-1, 1), "frequency_penalty": rng.uniform(-1, 1),
                                  "repetition_penalty": rng.uniform(0.8, 1.3)},
            "logit_bias": lambda: {"logit_bias": {t: rng.uniform(-5, 5) for t in self.random_ids(rng, 3)}},
            "min_new_tokens": lambda: {"min_new_tokens": rng.randint(0, max_new)},
            "json": lambda: {"response_format": ("json_object", "")},
            "bypass_prefix_cache": lambda: {"bypass_prefix_cache": True},
        }
        names = rng.sample(sorted(choices), rng.randint(1, 2))
        if "json" in names and "min_new_tokens" in names:  # a format ends with EOS: min_new_tokens must be unset
            names.remove("min_new_tokens")
        out: dict[str, Any] = {}
        for name in names:
            out.update(choices[name]())
        return out

    # -- one stream -----------------------------------------------------------------------------------------

    async def _read(self, call: Any, action: str, method: str = "Generate") -> tuple[str, list[int]]:
        """Read a stream to its end; returns its status code and every token it carried."""
        tokens: list[int] = []
        try:
            async for resp in call:
                tokens += resp.token_ids
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = code_of(e)
        self.tally.tokens += len(tokens)
        self.tally.requests_ok += code == "OK"
        self.tally.count(method, action, code)
        return code, tokens

    async def _cancel_after(self, call: Any, k: int, action: str) -> str:
        """Read k chunks (0: none, only wait until the call is out), then close the stream."""
        try:
            if k == 0:
                await call.wait_for_connection()
            else:
                n = 0
                async for resp in call:
                    self.tally.tokens += len(resp.token_ids)
                    n += 1
                    if n >= k:
                        break
            call.cancel()  # False when the stream already ended: then its own code stands
            code = (await call.code()).name
        except grpc.aio.AioRpcError as e:
            code = code_of(e)
        self.tally.count("Generate", action, code)
        return code

    # -- actions --------------------------------------------------------------------------------------------

    async def normal(self, rng: random.Random) -> str:
        fields = {**self._prompt(rng), **self._sampling(rng)}
        roll = rng.random()
        if roll < 0.1:
            return await self._unary("GenerateUnary", "normal", self.client.generate(**fields))
        if roll < 0.15:
            text = fields.get("text") or "hello soak"
            return await self._unary("Tokenize", "normal", self.client.tokenize(text=text))
        if roll < 0.2:
            return await self._unary("Detokenize", "normal", self.client.detokenize(self.random_ids(rng, 32)))
        code, _ = await self._read(self.client.generate_stream(**fields), "normal")
        return code

    async def _unary(self, method: str, action: str, coro: Any) -> str:
        try:
            result = await coro
            code = "OK"
            if method == "GenerateUnary":
                self.tally.tokens += len(result.token_ids)
                self.tally.requests_ok += 1
        except grpc.aio.AioRpcError as e:
            code = code_of(e)
        self.tally.count(method, action, code)
        return code

    async def cancel(self, rng: random.Random) -> str:
        fields = {**self._prompt(rng), **self._sampling(rng, rng.randint(8, 64))}
        return await self._cancel_after(self.client.generate_stream(**fields), rng.choice((0, 0, 1, 2, 3, 5)),
                                        "cancel")

    async def deadline(self, rng: random.Random) -> str:
        fields = {**self._prompt(rng), **self._sampling(rng, rng.randint(16, 96))}
        code, _ = await self._read(self.client.generate_stream(timeout=rng.uniform(0.05, 2.0), **fields), "deadline")
        return code

    def _bad_requests(self) -> dict[str, Any]:
        """name -> keyword fields for Client (a dict) or raw request bytes."""
        limit_chars = 16 * self.info.max_model_len  # the proto's size limit: 16 characters per token
        hi = convert.request(text="hi").SerializeToString()
        return {
            "max_new_tokens=0": {"text": "hi", "max_new_tokens": 0},
            "max_new_tokens=-1 (wire)": hi + _field(6, b"\x08" + _varint(2**64 - 1)),  # int -1 as a varint
            "temperature=-1": {"text": "hi", "temperature": -1.0},
            "top_p=0": {"text": "hi", "top_p": 0.0},
            "unknown chat role": {"chat": [("wizard", "hi")]},
            "out-of-vocab id": {"token_ids": [1, self.info.vocab_size + 7]},
            "empty input": {"max_new_tokens": 4},
            "empty text": {"text": ""},
            "huge text": {"text": "a" * (limit_chars + 1), "max_new_tokens": 1},
            "bad utf-8 text": _field(2, b"ok \xff\xfe"),
            "bad utf-8 request_id": _field(1, b"\xc3\x28") + _field(2, b"hi"),
            "bad utf-8 chat role": _field(4, _field(1, _field(1, b"\xff") + _field(2, b"hi"))),
        }

    async def bad(self, rng: random.Random) -> str:
        kinds = self._bad
        kind = rng.choice([*kinds, "random bytes"])
        req = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) if kind == "random bytes" \
            else kinds[kind]
        # random bytes can parse as a real prompt with the default max_new_tokens: the short timeout bounds it
        call = self.client.generate_stream(timeout=30, **req) if isinstance(req, dict) else \
            self._raw(req, timeout=5 if kind == "random bytes" else 30)
        try:
            async for _ in call:
                pass
            code, details = "OK", ""
        except grpc.aio.AioRpcError as e:
            code, details = code_of(e), e.details() or ""
        self.tally.count("Generate", f"bad/{kind}", code)
        # random bytes may happen to parse as a valid request (then any code but a server fault); everything else
        # must be refused as invalid, worker up or down, since validation comes first
        wrong = code in _SERVER_FAULT if kind == "random bytes" else code != "INVALID_ARGUMENT"
        if wrong:
            self.tally.bad_unexpected[f"{kind}: {code}"] += 1
            self.tally.bad_examples.setdefault(f"{kind}: {code}", details[:200])
        return code

    async def _compare(self, rng: random.Random, rid: str, action: str, cancel_first: bool) -> str:
        prompt, want = rng.choice(self.baselines)
        if cancel_first:  # the label's previous stream is still being torn down when the next one arrives
            await self._cancel_after(self.client.generate_stream(request_id=rid, token_ids=prompt, max_new_tokens=64,
                                                                 temperature=0.0), rng.choice((0, 1)), action)
        code, got = await self._read(self.client.generate_stream(
            request_id=rid, token_ids=prompt, max_new_tokens=BASELINE_TOKENS, **GREEDY), action)
        if code == "OK":
            self.tally.compared[action] += 1
            if got != want:
                self.tally.mismatches[action] += 1
                if len(self.tally.mismatch_examples) < 10:
                    self.tally.mismatch_examples.append({"action": action, "request_id": rid, "want": want,
                                                         "got": got})
        return code

    async def reused(self, rng: random.Random, control: bool = False) -> str:
        n = rng.randint(2, 3)
        shared = rng.choice(SHARED_IDS)
        ids = [f"soak-{uuid.uuid4().hex[:12]}" if control else shared for _ in range(n)]
        action = "control" if control else "reused"
        codes = await asyncio.gather(*[self._compare(rng, rid, action, i == 0) for i, rid in enumerate(ids)])
        return "UNAVAILABLE" if "UNAVAILABLE" in codes else codes[0]

    async def control(self, rng: random.Random) -> str:
        return await self.reused(rng, control=True)

    async def client_loop(self, index: int, stop: asyncio.Event) -> None:
        """One client: actions until `stop`; backs off after UNAVAILABLE (the worker is restarting)."""
        rng = random.Random(self.seed * 1000 + index)
        names, weights = list(ACTIONS), list(ACTIONS.values())
        while not stop.is_set():
            action = rng.choices(names, weights)[0]
            try:
                code = await getattr(self, action)(rng)
            except Exception as e:  # noqa: BLE001 - a harness bug must show in the report, not end the run
                self.tally.client_errors[f"{action}: {e!r}"[:200]] += 1
                code = "UNAVAILABLE"  # back off as after a failure
            if code == "UNAVAILABLE":
                await asyncio.sleep(rng.uniform(0.5, 1.5))
