"""qnext-generate's output without a server: a stand-in Client streams GenerateResponse messages. The text on
stdout ends with a newline (so the shell prompt does not land on its last line), the reasoning on stderr ends its
line before the content starts, and the finish and error lines start lines of their own."""

from __future__ import annotations

import grpc
import pytest

from qnext.rpc import generate_cli
from qnext.v1 import generation_pb2 as pb


class FakeClient:
    """Client's interface as generate_cli uses it; generate_stream yields `chunks`, then raises `error` if set."""

    chunks: list = []
    error: Exception | None = None

    def __init__(self, target: str, timeout: float | None = None) -> None:
        self.target = target

    async def __aenter__(self) -> "FakeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def _stream(self):
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    def generate_stream(self, timeout: float | None = None, **fields):
        return self._stream()


def finish() -> pb.FinishInfo:
    return pb.FinishInfo(reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=1, completion_tokens=2))


def generate(monkeypatch, capsys, chunks, error=None) -> tuple[str, str, int]:
    monkeypatch.setattr(FakeClient, "chunks", chunks)
    monkeypatch.setattr(FakeClient, "error", error)
    monkeypatch.setattr(generate_cli, "Client", FakeClient)
    rc = generate_cli.main(["Hello"])
    out, err = capsys.readouterr()
    return out, err, rc


def test_text_ends_with_a_newline(monkeypatch, capsys):
    out, err, rc = generate(monkeypatch, capsys, [pb.GenerateResponse(text="Hel"), pb.GenerateResponse(text="lo"),
                                                  pb.GenerateResponse(finish=finish())])
    assert rc == 0 and out == "Hello\n"
    assert err.startswith("[length] prompt 1 tokens, completion 2 tokens") and err.endswith(" ms\n") \
        and err.count("\n") == 1, err


def test_a_newline_of_the_text_is_not_doubled(monkeypatch, capsys):
    out, _, _ = generate(monkeypatch, capsys, [pb.GenerateResponse(text="line\n", finish=finish())])
    assert out == "line\n"


def test_no_finish_chunk_still_ends_the_line(monkeypatch, capsys):
    out, err, rc = generate(monkeypatch, capsys, [pb.GenerateResponse(text="cut off")])
    assert rc == 0 and out == "cut off\n" and err == ""


def test_reasoning_line_ends_before_the_content(monkeypatch, capsys):
    out, err, rc = generate(monkeypatch, capsys, [pb.GenerateResponse(reasoning_text="let me think"),
                                                  pb.GenerateResponse(text="42"),
                                                  pb.GenerateResponse(finish=finish())])
    assert rc == 0 and out == "42\n"
    assert err.startswith("let me think\n[length]") and err.endswith(" ms\n"), err  # capsys: not a TTY, so not dimmed


def test_error_line_after_partial_text(monkeypatch, capsys):
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="draining")
    out, err, rc = generate(monkeypatch, capsys, [pb.GenerateResponse(text="part")], error)
    assert rc == 1 and out == "part\n"
    assert err == "qnext-generate: UNAVAILABLE: draining\n"


@pytest.mark.parametrize("chunks", [[], [pb.GenerateResponse(finish=finish())]])
def test_nothing_generated_prints_no_empty_line(monkeypatch, capsys, chunks):
    out, _, rc = generate(monkeypatch, capsys, chunks)
    assert rc == 0 and out == ""


def test_tools_and_json_schema_flags(monkeypatch, capsys, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "get_time", "description": "now", '
                     '"parameters": {"type": "object"}}}, {"name": "noop"}]')
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    args = generate_cli.main.__globals__["argparse"].Namespace
    sent = generate_cli._fields(args(token_ids=None, chat=True, system=None, thinking=None, prompt="hi", stop=[],
                                     json_schema=str(schema), regex=None, tools=str(tools), tool_choice="required", logit_bias=None, n=1,
                                     **{n: None for n in ("temperature", "top_p", "top_k", "min_p",
                                                          "repetition_penalty", "seed", "max_new_tokens",
                                                          "max_reasoning_tokens")}))
    assert sent["response_format"] == ("json_schema", '{"type": "object"}') and sent["tool_choice"] == "required"
    assert [(t.name, t.description, t.parameters) for t in sent["tools"]] == [("get_time", "now", {"type": "object"}),
                                                                              ("noop", "", {})]
    chunks = [pb.GenerateResponse(tool_calls=[pb.ToolCallDelta(index=0, id="call_1", name="get_time",
                                                               arguments_delta='{"tz"')]),
              pb.GenerateResponse(tool_calls=[pb.ToolCallDelta(index=0, arguments_delta=': "UTC"}')]),
              pb.GenerateResponse(finish=finish())]
    out, _, rc = generate(monkeypatch, capsys, chunks)
    assert rc == 0 and out == '[tool call 0: get_time] {"tz": "UTC"}\n'
    (tmp_path / "bad.json").write_text("{")
    assert generate_cli.main(["hi", "--chat", "--tools", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.startswith("qnext-generate: --tools: ")


def test_logit_bias_flag(monkeypatch, capsys):
    sent = {}

    class Recording(FakeClient):
        def generate_stream(self, timeout: float | None = None, **fields):
            sent.update(fields)
            return self._stream()
    monkeypatch.setattr(Recording, "chunks", [pb.GenerateResponse(finish=finish())])
    monkeypatch.setattr(generate_cli, "Client", Recording)
    assert generate_cli.main(["hi", "--logit-bias", '{"1234": 100, "7": -5.5}']) == 0
    assert sent["logit_bias"] == {1234: 100.0, 7: -5.5}
    capsys.readouterr()
    for bad in ("[1, 2]", '{"x": 1}', "{"):
        assert generate_cli.main(["hi", "--logit-bias", bad]) == 2
        assert capsys.readouterr().err.startswith("qnext-generate: --logit-bias: expected a JSON object")


def test_parallel_samples_are_printed_whole_as_each_finishes(monkeypatch, capsys):
    """--n 2: interleaved responses; each sample's text comes out in one piece, after its `[sample i]` line."""
    monkeypatch.setattr(FakeClient, "chunks", [pb.GenerateResponse(text="a", index=0),
                                               pb.GenerateResponse(text="x", index=1),
                                               pb.GenerateResponse(text="y", index=1, finish=finish()),
                                               pb.GenerateResponse(text="b", index=0, finish=finish())])
    monkeypatch.setattr(FakeClient, "error", None)
    monkeypatch.setattr(generate_cli, "Client", FakeClient)
    rc = generate_cli.main(["Hello", "--n", "2"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == "xy\nab\n"
    assert [line.split("]")[0] for line in err.splitlines()] == ["[sample 1", "[length", "[sample 0", "[length"]
