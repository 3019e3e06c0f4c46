"""YaRN long context: the length a config supports, --rope-scaling / --hf-overrides without touching the
checkpoint, and a 6K-token prompt against transformers with the same rope scaling (issue: long context)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from hf_reference import make_hf_checkpoint
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
# every head dim rotated (8 frequencies at head_dim 16), so the lowest ones have wavelengths past the original
# 2,048 positions, which YaRN interpolates: with the test models' usual 0.25 only two fast ones rotate, which
# YaRN leaves alone
PLAIN = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
GREEDY = SamplingParams(temperature=0.0, top_logprobs=5)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(a checkpoint whose config has YaRN factor 4 over 2,048 positions, the same weights without it, the HF model)"""
    yarn_dir = tmp_path_factory.mktemp("yarn")
    hf = make_hf_checkpoint(yarn_dir, seed=5, max_position_embeddings=2048, rope_parameters={**PLAIN, **YARN},
                            full_attention_interval=2)  # two attention layers of four
    plain_dir = tmp_path_factory.mktemp("plain")
    for f in yarn_dir.iterdir():
        shutil.copy(f, plain_dir / f.name)
    cfg = json.loads((plain_dir / "config.json").read_text())
    cfg["rope_parameters"] = PLAIN
    (plain_dir / "config.json").write_text(json.dumps(cfg))
    return yarn_dir, plain_dir, hf


def greedy(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
    """n greedy tokens and the top-5 log-probs at each."""
    engine.add_request(GenerationRequest("r", prompt, GREEDY, StoppingParams(max_new_tokens=n, ignore_eos=True)))
    out, tops = [], []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
            tops += [dict(t) for t in o.top_logprobs]
    return out, tops


def test_yarn_6k_prompt_matches_transformers_and_rope_scaling_flag_equals_the_config(ckpts):
    yarn_dir, plain_dir, hf = ckpts
    prompt = torch.randint(0, 512, (6144,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = Engine(EngineConfig(model=str(yarn_dir), max_model_len=8192, seed=0))
    assert ours.max_model_len == 8192  # factor 4 x 2,048, beyond max_position_embeddings
    flag = Engine(EngineConfig(model=str(plain_dir), max_model_len=8192, seed=0, rope_scaling=json.dumps(YARN)))
    tokens, tops = greedy(ours, prompt, 4)
    assert greedy(flag, prompt, 4) == (tokens, tops)
    # the reference: transformers' forward over the prompt and our tokens, at every position we generated
    # (its generate() decodes through another path whose logits differ from its own forward by ~0.01 here)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].double()
    want = torch.log_softmax(logits, -1)
    for i, (token, top) in enumerate(zip(tokens, tops)):
        assert int(want[i].argmax()) == token, i
        assert max(abs(lp - float(want[i, t])) for t, lp in top.items()) < 2e-3, (i, top)
        assert set(top) == set(want[i].topk(5).indices.tolist()), i
    assert json.loads((plain_dir / "config.json").read_text())["rope_parameters"] == PLAIN  # untouched
    hf_overrides = json.dumps({"rope_scaling": YARN})
    assert Engine(EngineConfig(model=str(plain_dir), hf_overrides=hf_overrides)).max_model_len == 8192


def test_too_long_a_max_model_len_names_both_numbers(ckpts):
    yarn_dir, plain_dir, _ = ckpts
    with pytest.raises(ValueError, match=r"^max_model_len: 8193 is more than the model's config supports, 8192 "
                                         r"\(max_position_embeddings 2048; YaRN factor 4 x original_max_position_"
                                         r"embeddings 2048\)"):
        Engine(EngineConfig(model=str(yarn_dir), max_model_len=8193))
    with pytest.raises(ValueError, match=r"^max_model_len: 4096 is more than the model's config supports, 2048 .*"
                                         r"--rope-scaling turns YaRN on"):
        Engine(EngineConfig(model=str(plain_dir), max_model_len=4096))
    with pytest.raises(ValueError, match=r"^max_model_len: 8192 tokens do not fit the KV cache, which holds \d+ "
                                         r"tokens"):
        Engine(EngineConfig(model=str(yarn_dir), max_model_len=8192, cache_memory=1 << 20))
    # without --max-model-len the length is capped at what the cache holds
    small = Engine(EngineConfig(model=str(yarn_dir), cache_memory=1 << 20))
    assert small.max_model_len == small.cache_info.num_blocks * small.cache_info.block_size < 8192


@pytest.mark.parametrize("field, value", [("rope_scaling", "{"), ("rope_scaling", "[1]"), ("hf_overrides", "null"),
                                          ("hf_overrides", "3")])
def test_override_flags_must_be_json_objects(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig(**{field: value})


def test_the_comparison_sees_the_rope_scaling(ckpts):
    """Plain RoPE over the same 6K prompt (max_position_embeddings raised by --hf-overrides) gives other
    log-probs than YaRN, by ten times the tolerance above: the agreement there is not blind to the scaling."""
    yarn_dir, plain_dir, _ = ckpts
    prompt = torch.randint(0, 512, (6144,), generator=torch.Generator().manual_seed(0)).tolist()
    _, (yarn,) = greedy(Engine(EngineConfig(model=str(yarn_dir), max_model_len=8192, seed=0)), prompt, 1)
    _, (plain,) = greedy(Engine(EngineConfig(model=str(plain_dir), max_model_len=8192, seed=0,
                                             hf_overrides=json.dumps({"max_position_embeddings": 8192}))), prompt, 1)
    common = yarn.keys() & plain.keys()
    assert common != yarn.keys() or max(abs(yarn[t] - plain[t]) for t in common) > 0.02, (yarn, plain)


@pytest.mark.parametrize("flags, message", [
    (["--max-model-len", "300000"],
     "qnext-serve: --max-model-len: 300000 is more than the model's config supports, 262144"),
    (["--rope-scaling", json.dumps({**YARN, "original_max_position_embeddings": 262144}), "--max-model-len",
      "1048576", "--cache-memory", "1048576"],  # YaRN allows 1,048,576 tokens; a 1 MiB cache does not
     "qnext-serve: --max-model-len: 1048576 tokens do not fit the KV cache, which holds"),
    (["--rope-scaling", "[4]"], "qnext-serve: error: --rope-scaling: must be a JSON object or null"),  # argparse
])
def test_server_start_up_refuses_a_length_it_cannot_serve(default_ckpt, flags, message):
    """Exit 2 with the engine's message naming the flag, and no worker restarted forever."""
    proc = subprocess.run([sys.executable, "-m", "qnext.rpc.server", "--model", str(default_ckpt), "--port", "0",
                           "--metrics-port", "-1", *flags], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_overrides_leave_the_reported_checkpoint_and_the_banner_as_they_are(default_ckpt, tmp_path):
    """With --rope-scaling the server reads an overlay, but it names the checkpoint itself (GetModelInfo's model_id,
    the start-up line), reports the longer length, and says metrics are off when they are."""
    import asyncio
    from qnext.rpc.client import Client
    from test_service_support import ServerProcess
    rope = json.dumps({**YARN, "original_max_position_embeddings": 262144})
    s = ServerProcess(default_ckpt, "--rope-scaling", rope, "--max-model-len", "300000", "--cache-memory",
                      str(512 << 20), "--metrics-port", "-1", log_path=tmp_path / "server.log")
    try:
        async def info():
            async with Client(s.target) as c:
                return await c.model_info()
        m = asyncio.run(info())
        assert m.model_id == default_ckpt.name and m.max_model_len == 300000
        assert f"model {default_ckpt}" in s.banner and "metrics off" in s.banner and s.metrics_port == -1
    finally:
        assert s.stop() == 0
