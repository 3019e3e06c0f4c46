"""qnext-batch end to end on the embedded default: text and token-id inputs, bad lines skipped with their
line number, results equal to the in-process engine."""

from __future__ import annotations

import json
import subprocess
import sys

from tokenizers import Tokenizer

from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams


def test_qnext_batch(default_ckpt, tmp_path):
    tok = Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))
    engine = Engine(EngineConfig(model=str(default_ckpt), seed=0, cache_memory=64 << 20))
    fox = tok.encode("The quick brown fox", add_special_tokens=False).ids
    free = engine.generate([fox], SamplingParams(temperature=0), StoppingParams(max_new_tokens=12, ignore_eos=True))[0]
    free_text = tok.decode(free.token_ids, skip_special_tokens=True)
    stop = next(t for t in (tok.decode([i]) for i in free.token_ids[3:]) if t.strip() and t in free_text)
    lines = [
        {"id": "a", "text": "Hello, world", "sampling": {"temperature": 0}, "stopping": {"max_new_tokens": 6}},
        {"token_ids": [1, 2, 3], "sampling": {"temperature": 0.8, "seed": 5}, "stopping": {"max_new_tokens": 4}},
        "not json",
        {"text": "x", "sampling": {"top_p": 1.5}},
        {"text": "y", "stopping": {"max_tokens": 3}},
        {"id": "b", "text": "The quick brown fox", "sampling": {"temperature": 0},
         "stopping": {"max_new_tokens": 5, "ignore_eos": True}},
        {"id": "c", "token_ids": fox, "sampling": {"temperature": 0},
         "stopping": {"max_new_tokens": 12, "ignore_eos": True, "stop_strings": [stop]}},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    dst = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "qnext.worker.batch_cli", "--model", str(default_ckpt), "--input",
                           str(src), "--output", str(dst), "--cache-memory", str(64 << 20), "--seed", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "line 3:" in proc.stderr and "line 4: top_p" in proc.stderr and "line 5: stopping.max_tokens" in proc.stderr
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o.get("id") or o.get("line") for o in out] == ["a", "line-2", 3, 4, 5, "b", "c"]
    assert all("error" in out[i] for i in (2, 3, 4))

    want = engine.generate([tok.encode("Hello, world", add_special_tokens=False).ids], SamplingParams(temperature=0),
                           StoppingParams(max_new_tokens=6))[0]
    assert out[0]["token_ids"] == want.token_ids
    assert out[0]["text"] == tok.decode(want.token_ids, skip_special_tokens=True)
    assert out[0]["usage"]["prompt_tokens"] == 3 and out[0]["finish_reason"] in ("length", "eos")
    assert len(out[1]["token_ids"]) <= 4 and len(out[5]["token_ids"]) == 5
    assert out[6]["finish_reason"] == "stop_string" and out[6]["text"] == free_text[:free_text.find(stop)]


def test_qnext_batch_with_speculation_matches_plain(default_ckpt, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"token_ids": [1, 2, 3 + i], "sampling": {"temperature": 0},
                                         "stopping": {"max_new_tokens": 8, "ignore_eos": True}}) for i in range(3))
                   + "\n")
    outs = []
    for k in ("0", "2"):
        dst = tmp_path / f"out{k}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "qnext.worker.batch_cli", "--model", str(default_ckpt), "--input",
                               str(src), "--output", str(dst), "--cache-memory", str(64 << 20),
                               "--num-speculative-tokens", k], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append([json.loads(x) for x in dst.read_text().splitlines()])
    assert [o["token_ids"] for o in outs[0]] == [o["token_ids"] for o in outs[1]]
    assert all(o["spec"]["drafted_tokens"] > 0 for o in outs[1]) and "MTP drafted" in proc.stderr


def test_qnext_batch_creates_the_output_directory(default_ckpt, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "x", "token_ids": [1, 2, 3], "sampling": {"temperature": 0},
                               "stopping": {"max_new_tokens": 2, "ignore_eos": True}}) + "\n")
    dst = tmp_path / "out" / "nested" / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "qnext.worker.batch_cli", "--model", str(default_ckpt), "--input",
                           str(src), "--output", str(dst), "--cache-memory", str(16 << 20)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [out] = [json.loads(x) for x in dst.read_text().splitlines()]
    assert out["id"] == "x" and len(out["token_ids"]) == 2


def test_qnext_batch_bad_output_fails_before_loading_the_model(tmp_path):
    """A usage error naming --output, exit 2, no traceback; the model (a directory that does not exist) is never
    loaded, or the error would be about it."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"token_ids": [1]}\n')
    (tmp_path / "a_file").write_text("")
    missing_model = str(tmp_path / "no_model")
    for output, why in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "out.jsonl", "cannot create directory"),
                        (tmp_path / "a_file" / "x" / "out.jsonl", "cannot create directory")):
        proc = subprocess.run([sys.executable, "-m", "qnext.worker.batch_cli", "--model", missing_model, "--input",
                               str(src), "--output", str(output)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "qnext-batch: error: --output: " in proc.stderr and why in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qnext.worker.batch_cli", "--model", missing_model, "--input",
                           str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o" / "out.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "qnext-batch: error: --input: no such file" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()  # --input is checked first: nothing was created
