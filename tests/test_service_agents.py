"""Agents through gRPC: response_format (JSON schema, regex, EBNF), tools with tool_choice required / a tool's name
(typed calls streamed as deltas, valid against their schemas, finish reason TOOL_CALLS), tool history in the
prompt, the reasoning parser with calls, and bad formats refused naming the field. Random weights: a constraint
makes the output valid whatever the model; validity is checked by jsonschema and Python's re."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import pytest

from qnext.rpc import convert
from qnext.rpc.client import Client
from qnext.rpc.stream import OutputAssembler
from qnext.rpc.text import ChatMessage, TextProcessor
from qnext.rpc.tool_calls import Tool, ToolCall, assemble_calls
from qnext.rpc.validate import Limits, GenerateSpec, prepare
from qnext.worker.types import FinishReason, RequestOutput
from test_service_support import ServerProcess

WEATHER = Tool("get_weather", "Current weather in a city", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
TIME = Tool("get_time", "Time in a timezone", {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "JST"]}, "hours": {"type": "integer",
                                                                                         "minimum": 0, "maximum": 23}},
    "required": ["tz"], "additionalProperties": False})
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99},
                                           "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4}},
          "required": ["ok", "n", "items"], "additionalProperties": False}
CHAT = [("system", "You are a helpful assistant."), ("user", "What is the weather in Paris?")]


@pytest.fixture(scope="module")
def server(default_ckpt, tmp_path_factory):
    s = ServerProcess(default_ckpt, log_path=tmp_path_factory.mktemp("agents") / "server.log")
    yield s
    assert s.stop() == 0


async def stream(c: Client, **fields) -> tuple[str, list, object]:
    text, deltas, finish = "", [], None
    async for chunk in c.generate_stream(**fields):
        text += chunk.text
        deltas += list(chunk.tool_calls)
        if chunk.HasField("finish"):
            finish = chunk.finish
    return text, deltas, finish


def test_response_formats_through_grpc(server):
    regex = r"(red|green|blue)-[0-9]{3}"
    ebnf = 'root ::= item (" " item)*\nitem ::= "x" | "yy" | "zzz"'

    async def go():
        async with Client(server.target) as c:
            fmt = [("json_schema", json.dumps(SCHEMA))] * 6 + [("regex", regex)] * 3 + [("grammar", ebnf)] * 3 \
                + [("json_object", "")] * 2
            return fmt, await asyncio.gather(*[
                stream(c, chat=CHAT, response_format=f, temperature=1.0, seed=i, max_new_tokens=96)
                for i, f in enumerate(fmt)])

    fmt, results = asyncio.run(go())
    for (kind, _), (text, deltas, finish) in zip(fmt, results):
        reason = convert.finish_reason_name(finish.reason)
        assert not deltas
        if kind == "json_object":  # free strings: a random model may run out of tokens inside one
            assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict)), text
            continue
        assert reason == "eos", (kind, text)
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(regex, text), text
        else:
            assert re.fullmatch(r"(x|yy|zzz)( (x|yy|zzz))*", text), text


def test_bad_formats_and_tools_are_refused_naming_the_field(server):
    cases = [
        (dict(response_format=("json_schema", "{oops")), "response_format.json_schema: "),
        (dict(response_format=("json_schema", '{"type": 7}')), "response_format.json_schema: "),
        (dict(response_format=("regex", "(a")), "response_format.regex: "),
        (dict(response_format=("grammar", "root ::= (")), "response_format.grammar: "),
        (dict(response_format=("json_object", ""), ignore_eos=True), "stopping.ignore_eos: "),
        (dict(tools=[WEATHER, WEATHER]), "chat.tools[1].name: "),
        (dict(tools=[Tool("bad name", "", {})]), "chat.tools[0].name: "),
        (dict(tools=[Tool("deep", "", _deep(100))]),
         "chat.tools[0].parameters_json_schema: "),
        (dict(response_format=("json_schema", "[" * 100000 + "]" * 100000)), "response_format.json_schema: "),
        (dict(tools=[WEATHER], tool_choice="get_time"), "chat.tool_choice: "),
        (dict(tools=[WEATHER], tool_choice="required", response_format=("json_object", "")), "chat.tool_choice: "),
        (dict(chat=[("user", "hi"), ChatMessage("assistant", "", (ToolCall("c1", "f", "[1]"),))]),
         "chat.messages[1].tool_calls[0].arguments_json: "),
    ]

    async def go():
        async with Client(server.target) as c:
            errors = []
            for fields, _ in cases:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate(**{"chat": CHAT, "max_new_tokens": 4, **fields})
                errors.append(e.value)
            ok = await c.generate(chat=CHAT, max_new_tokens=2)  # still serving
            return errors, ok

    errors, ok = asyncio.run(go())
    for (_, prefix), e in zip(cases, errors):
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(prefix), e.details()
    assert len(ok.token_ids) == 2


def test_required_tool_calls_are_typed_valid_and_streamed(server):
    schemas = {t.name: t.parameters for t in (WEATHER, TIME)}

    async def go():
        async with Client(server.target) as c:
            streamed = await asyncio.gather(*[
                stream(c, chat=CHAT, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=i,
                       max_new_tokens=120) for i in range(8)])
            unary = await c.generate(chat=CHAT, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0,
                                     seed=3, max_new_tokens=120)
            named = await c.generate(chat=CHAT, tools=[WEATHER, TIME], tool_choice="get_time", temperature=1.0,
                                     seed=5, max_new_tokens=120)
            return streamed, unary, named

    streamed, unary, named = asyncio.run(go())
    for text, deltas, finish in streamed:
        assert convert.finish_reason_name(finish.reason) == "tool_calls" and text == ""
        calls = assemble_calls([d for d in deltas])
        assert calls and [d.index for d in deltas if d.id] == list(range(len(calls)))
        for call in calls:
            assert call.id.startswith("call_") and call.name in schemas
            jsonschema.validate(json.loads(call.arguments_json), schemas[call.name])
    assert [(t.name, t.arguments_json) for t in unary.tool_calls] == \
        [(t.name, t.arguments_json) for t in assemble_calls(streamed[3][1])]  # same seed: same calls
    assert len(named.tool_calls) == 1 and named.tool_calls[0].name == "get_time"
    jsonschema.validate(json.loads(named.tool_calls[0].arguments_json), TIME.parameters)


def test_tool_history_renders_as_the_template_says(server, default_ckpt):
    """The prompt a history with calls and results becomes is the text side's rendering (itself checked against
    transformers' apply_chat_template in test_tool_calls.py), token for token."""
    history = [*[ChatMessage(r, c) for r, c in CHAT],
               ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)),
               ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1"), ChatMessage("user", "And in Rome?")]

    async def go():
        async with Client(server.target) as c:
            return await c.generate(chat=history, tools=[WEATHER], max_new_tokens=1, temperature=0.0)

    result = asyncio.run(go())
    text = TextProcessor(default_ckpt)
    rendered = text.render_chat(history, tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in rendered and "<tool_response>\n{\"temp\": 21}\n</tool_response>" in rendered
    assert result.finish.usage.prompt_tokens == len(text.encode_chat(history, tools=[WEATHER]))


def test_tokenize_renders_tools_as_generate_does(server, default_ckpt):
    """Tokenize with chat + tools gives the ids transformers' apply_chat_template(tools=...) gives, and the count
    Generate reports for the same chat; a bad schema is refused naming the field, and the server goes on."""
    from transformers import AutoTokenizer  # test-time reference only
    ref = AutoTokenizer.from_pretrained(str(default_ckpt))
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in (WEATHER, TIME)]
    want = ref.apply_chat_template([{"role": r, "content": c} for r, c in CHAT], tools=tools,
                                   add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    bad = convert.tokenize_request(chat=CHAT)
    bad.chat.tools.add(name="broken", parameters_json_schema="{not json")

    async def go():
        async with Client(server.target) as c:
            with_tools = await c.tokenize(chat=CHAT, tools=[WEATHER, TIME])
            without = await c.tokenize(chat=CHAT)
            generated = await c.generate(chat=[ChatMessage(r, m) for r, m in CHAT], tools=[WEATHER, TIME],
                                         max_new_tokens=1, temperature=0.0)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await c._stub.Tokenize(bad, timeout=30)
            return with_tools, without, generated, refused.value, await c.tokenize(chat=CHAT, tools=[WEATHER])
    with_tools, without, generated, refused, after = asyncio.run(go())
    assert with_tools == want and len(without) < len(want)
    assert generated.finish.usage.prompt_tokens == len(want)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat.tools[0].parameters_json_schema" in refused.details()
    assert len(without) < len(after) < len(want)


def test_reasoning_and_tool_calls_separate(default_ckpt):
    """Thinking prompt + reasoning parser + tools: what the model writes before </think> is reasoning_text, the
    calls after it are typed calls, nothing leaks into text; the constraint starts after </think>."""
    from qnext.worker.tiny import default_checkpoint
    ckpt = default_checkpoint(thinking=True)
    text = TextProcessor(ckpt)
    from qnext.worker.grammar import GrammarCompiler
    from qnext.worker.tokenizer_files import ENDOFTEXT_ID, IM_END_ID, VOCAB_SIZE
    text.grammars = GrammarCompiler(ckpt / "tokenizer.json", VOCAB_SIZE, (IM_END_ID, ENDOFTEXT_ID))
    spec = GenerateSpec(chat=[ChatMessage("user", "Weather in Paris?")], tools=[_proto_tool(WEATHER)],
                        tool_choice="required", max_new_tokens=64)
    prepared = prepare(spec, Limits(max_model_len=4096, vocab_size=VOCAB_SIZE), text)
    assert prepared.starts_in_reasoning and prepared.add.grammar_starts_after == text.think_end_id
    answer = ('Paris, so get_weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    ids = text.encode(answer, allow_special_tokens=True) + [IM_END_ID]
    matcher = text.grammars.start(prepared.add.grammar, prepared.add.grammar_starts_after)
    matcher.accept(ids[:-1])  # the answer after </think> is what the grammar allows
    assert matcher.matcher.is_accepting()
    asm = OutputAssembler(prepared, text, reasoning_parser=True, arrival=0.0)
    chunks = [asm.feed([_out(ids[i:i + 3], finished=i + 3 >= len(ids))]) for i in range(0, len(ids), 3)]
    assert "".join(c.reasoning_text for c in chunks) == "Paris, so get_weather.\n"
    assert "".join(c.text for c in chunks).strip() == ""
    calls = assemble_calls([d for c in chunks for d in c.tool_calls])
    assert [(t.name, t.arguments_json) for t in calls] == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    assert chunks[-1].finish.reason == "tool_calls"


def _deep(n: int) -> dict:
    value: dict = {"type": "object"}
    for _ in range(n):
        value = {"type": "object", "properties": {"x": value}}
    return value


def _proto_tool(t: Tool):
    from qnext.v1 import generation_pb2 as pb
    return pb.Tool(name=t.name, description=t.description, parameters_json_schema=json.dumps(t.parameters))


def _out(ids: list[int], finished: bool) -> RequestOutput:
    return RequestOutput("r", ids, [], [], finished, FinishReason.EOS if finished else None, 1, len(ids), 0)
