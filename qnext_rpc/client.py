"""A small typed async client for qnext.v1.Generation.

    async with Client("localhost:50051") as c:
        async for chunk in c.generate_stream(text="Hello", max_new_tokens=32, temperature=0.0):
            print(chunk.text, end="")
        result = await c.generate(chat=[("user", "Hi")])

Keyword fields are the proto's (text= | token_ids= | chat=[(role, content)], enable_thinking=, sampling
fields, stopping fields, top_logprobs=, num_speculative_tokens=, request_id=). Messages returned are the
proto messages themselves; errors are grpc.aio.AioRpcError with the server's status and message.

An API key and TLS (qnext/rpc/security.py): `Client(target, security=ClientSecurity(api_key="...",
ssl_ca_certs="ca.pem"))`; without `security`, plaintext with the key of $QNEXT_API_KEY when it is set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from qnext.rpc import convert
from qnext.rpc.security import ClientSecurity, make_channel
from qnext.rpc.tool_calls import Tool


class Client:
    def __init__(self, target: str, timeout: float | None = None, security: ClientSecurity | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = make_channel(target, security or ClientSecurity.from_env(),
                                     options=[("grpc.max_receive_message_length", 64 << 20)])
        self._stub = convert.GenerationStub(self._channel)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await self._channel.channel_ready()

    def generate_stream(self, timeout: float | None = None, **fields: Any) -> AsyncIterator[Any]:
        """Streams GenerateResponse messages; the last carries `finish`. Cancel by breaking out / cancel()."""
        return self._stub.Generate(convert.request(**fields), timeout=timeout or self.timeout)

    async def generate(self, timeout: float | None = None, **fields: Any) -> Any:
        """The whole GenerateResult in one message."""
        return await self._stub.GenerateUnary(convert.request(**fields), timeout=timeout or self.timeout)

    async def tokenize(self, text: str | None = None, chat: list[tuple[str, str]] | None = None,
                       tools: Sequence[Tool] = ()) -> list[int]:
        request = convert.tokenize_request(text, chat, tools)
        return list((await self._stub.Tokenize(request, timeout=self.timeout)).ids)

    async def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return (await self._stub.Detokenize(convert.detokenize(ids, skip_special_tokens), timeout=self.timeout)).text

    async def model_info(self) -> Any:
        return await self._stub.GetModelInfo(convert.empty_model_info_request(), timeout=self.timeout)

    async def server_stats(self) -> Any:
        return await self._stub.GetServerStats(convert.empty_stats_request(), timeout=self.timeout)

    async def reset_prefix_cache(self) -> Any:
        return await self._stub.ResetPrefixCache(convert.empty_reset_prefix_cache_request(), timeout=self.timeout)
