"""EngineConfig is the one source of the engine's command-line flags (worker/engine_flags.py): qnext-serve,
qnext-batch and qnext-validate spell, default and check them alike, and qnext-serve's historic spellings work."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from qnext.rpc import server
from qnext.worker import batch_cli, validate_cli
from qnext.worker.engine_flags import add_engine_flags, engine_config_from_args, flag_of
from qnext.worker.types import EngineConfig

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
BATCH_IO = ["--input", "in.jsonl", "--output", "out.jsonl"]
VALIDATE_IO = ["--model", "a", "--reference", "b"]

# qnext-serve's engine flags as they were spelled before they came from EngineConfig: each keeps working
HISTORIC_SERVE_FLAGS = {
    "--model": "/m", "--device": "cuda:1", "--dtype": "bfloat16", "--tensor-parallel-size": "2",
    "--max-model-len": "4096", "--max-num-seqs": "8", "--max-num-batched-tokens": "512", "--cache-memory": "0.5",
    "--num-speculative-tokens": "2", "--enforce-eager": None, "--cuda-graph-max-batch-size": "32",
    "--no-prefix-caching": None, "--num-checkpoints": "7", "--seed": "3",
}
HISTORIC_CONFIG = EngineConfig(model="/m", device="cuda:1", dtype="bfloat16", tensor_parallel_size=2,
                               max_model_len=4096, max_num_seqs=8, max_num_batched_tokens=512, cache_memory=0.5,
                               num_speculative_tokens=2, cuda_graphs="off", cuda_graph_max_batch_size=32,
                               enable_prefix_caching=False, num_checkpoints=7, seed=3)


def engine_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of the parser's flags whose dest is an EngineConfig field."""
    return {a.dest: a for a in parser._actions if a.dest in FIELDS and a.option_strings}


def argv(flags: dict[str, str | None]) -> list[str]:
    return [w for flag, value in flags.items() for w in ([flag] if value is None else [flag, value])]


def test_every_field_has_one_flag_with_help():
    flags = [flag_of(name) for name in FIELDS]
    assert len(set(flags)) == len(flags)
    for f in FIELDS.values():
        assert f.metadata.get("help"), f"EngineConfig.{f.name} has no help text for its flag"
    assert set(engine_actions(server.build_parser())) == set(FIELDS)  # qnext-serve has them all


def test_every_serve_engine_flag_is_accepted_by_batch_with_the_same_default():
    serve, batch = engine_actions(server.build_parser()), engine_actions(batch_cli.build_parser())
    assert set(serve) <= set(batch), f"qnext-batch lacks {sorted(set(serve) - set(batch))}"
    for dest, a in serve.items():
        b = batch[dest]
        assert b.option_strings == a.option_strings, dest
        assert b.default == a.default == FIELDS[dest].default, dest  # the defaults are EngineConfig's
        assert (b.type, b.choices, b.nargs, b.const) == (a.type, a.choices, a.nargs, a.const), dest


def test_the_same_command_line_gives_the_same_engine_config():
    sp, bp = server.build_parser(), batch_cli.build_parser()
    words = argv(HISTORIC_SERVE_FLAGS) + ["--block-size", "32", "--state-dtype", "bfloat16"]
    expected = dataclasses.replace(HISTORIC_CONFIG, block_size=32, state_dtype="bfloat16")
    assert engine_config_from_args(sp.parse_args(words), sp) == expected
    assert engine_config_from_args(bp.parse_args(words + BATCH_IO), bp) == expected
    assert engine_config_from_args(sp.parse_args([]), sp) == EngineConfig()
    assert engine_config_from_args(bp.parse_args(BATCH_IO), bp) == EngineConfig()


def test_historic_serve_flags_keep_their_spelling_and_meaning():
    p = server.build_parser()
    assert engine_config_from_args(p.parse_args(argv(HISTORIC_SERVE_FLAGS)), p) == HISTORIC_CONFIG
    args = p.parse_args([])
    assert args.model is None  # no --model: the embedded default (resolved at start-up, tests/test_torch_free.py)
    assert (args.cuda_graphs, args.enable_prefix_caching) == ("auto", True)


def test_validate_takes_the_engine_flags_that_make_sense_for_it():
    serve, val = engine_actions(server.build_parser()), engine_actions(validate_cli.build_parser())
    # --model / --reference are validate's own (two checkpoints), not the engine flag
    val = {d: a for d, a in val.items() if d != "model"}
    assert set(val) == set(FIELDS) - set(validate_cli.FIXED_OPTIONS)
    for dest, a in val.items():
        assert (a.option_strings, a.default) == (serve[dest].option_strings, serve[dest].default), dest
    p = validate_cli.build_parser()
    config = engine_config_from_args(p.parse_args(VALIDATE_IO + ["--enforce-eager"]), p,
                                     **validate_cli.FIXED_OPTIONS)
    assert config == dataclasses.replace(validate_cli.ENGINE_DEFAULTS, cuda_graphs="off")
    assert config.max_num_seqs == 1 and not config.enable_prefix_caching
    with pytest.raises(SystemExit):
        p.parse_args(VALIDATE_IO + ["--num-speculative-tokens", "1"])


@pytest.mark.parametrize("words, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs: must be >= 1, got 0"),
    (["--num-speculative-tokens", "5"], "--num-speculative-tokens: must be in [0, 4], got 5"),
    (["--cache-memory", "-1"], "--cache-memory: must be >= 0, got -1.0"),
    (["--cache-memory", "inf"], "--cache-memory: must be a finite number, got inf"),
    (["--max-model-len", "0"], "--max-model-len: must be >= 1, got 0"),
])
@pytest.mark.parametrize("build, extra", [(server.build_parser, []), (batch_cli.build_parser, BATCH_IO)])
def test_a_bad_value_is_a_usage_error_naming_the_flag(build, extra, words, message, capsys):
    p = build()
    args = p.parse_args(words + extra)  # argparse converts; EngineConfig alone checks the value
    with pytest.raises(SystemExit) as e:
        engine_config_from_args(args, p)
    assert e.value.code == 2
    assert f"{p.prog}: error: {message}" in capsys.readouterr().err


def test_exclusions_and_overrides():
    p = argparse.ArgumentParser(prog="x")
    add_engine_flags(p, exclude=("seed", "model"))
    assert "seed" not in engine_actions(p) and "model" not in engine_actions(p)
    p.add_argument("--model", default="mine")  # a flag of the command's own with a field's dest is not read
    assert engine_config_from_args(p.parse_args([]), p, seed=5) == EngineConfig(seed=5)
    with pytest.raises(ValueError, match="exclude"):
        add_engine_flags(argparse.ArgumentParser(), exclude=("no_such_field",))
