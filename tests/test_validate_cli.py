"""qnext-validate: A vs A is exact; the embedded default's FP8 copy vs its BF16 original gives KL and agreement
that an independent teacher-forced forward (tests/paged_runner.py, not the engine) reproduces."""

from __future__ import annotations

import json

import pytest
import torch

from paged_runner import PagedRunner
from qnext.worker import validate_cli
from qnext.worker.loader import load_model
from qnext.worker.tiny import make_checkpoint

N = 4
PROMPTS = ["The capital of France is", "def fibonacci(n):\\n    "]  # a literal \n stands for a newline
ARGS = ["--max-new-tokens", str(N), "--cache-memory", "67108864"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def fp8_copy(default_ckpt, tmp_path_factory):
    """The default checkpoint's FP8 block-128 variant (same seed and config; the tokenizer comes from the
    reference, so it is not written here)."""
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny-fp8", fp8=True, tokenizer=False)


def run_cli(model, reference, prompts_file, tmp_path, capsys) -> dict:
    out = tmp_path / "validate.json"
    rc = validate_cli.main(["--model", str(model), "--reference", str(reference), "--prompts", str(prompts_file),
                            "--out", str(out), *ARGS])
    assert rc == 0
    assert "top-1" in capsys.readouterr().out
    return json.loads(out.read_text())


def test_a_vs_a_is_exact(default_ckpt, prompts_file, tmp_path, capsys):
    doc = run_cli(default_ckpt, default_ckpt, prompts_file, tmp_path, capsys)
    assert doc["summary"]["kl_max"] < 1e-6 and doc["summary"]["top1_agreement"] == 1.0
    assert len(doc["prompts"]) == len(PROMPTS)
    for p in doc["prompts"]:
        assert p["match_length"] == N and p["continuation"] == p["reference_continuation"]
        for side in ("model", "reference"):
            assert p[side]["prefill_ms"] > 0 and p[side]["decode_ms_per_token"] > 0


def test_fp8_vs_bf16_matches_an_independent_forward(default_ckpt, fp8_copy, prompts_file, tmp_path, capsys, report):
    doc = run_cli(fp8_copy, default_ckpt, prompts_file, tmp_path, capsys)
    s = doc["summary"]
    report("qnext-validate tiny FP8 vs BF16 (2 prompts, N=4): KL mean / max (nats), top-1, match length",
           f"{s['kl_mean']:.3g} / {s['kl_max']:.3g}, {s['top1_agreement']:.2f}, {s['match_length_mean']:.1f}")
    assert 0 < s["kl_mean"] < float("inf")  # FP8 rounding moves the distributions, but not to nowhere

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))
    ref, fp8 = load_model(default_ckpt), load_model(fp8_copy)
    for text, p in zip(PROMPTS, doc["prompts"]):
        ids = tok.encode(text.replace("\\n", "\n"), add_special_tokens=False).ids
        cont = p["reference_continuation"]
        assert len(cont) == N and p["num_prompt_tokens"] == len(ids)
        seq = ids + cont[:-1]
        lr = torch.log_softmax(_logits(ref, seq)[len(ids) - 1:], -1)
        lm = torch.log_softmax(_logits(fp8, seq)[len(ids) - 1:], -1)
        assert lr.argmax(-1).tolist() == cont  # the continuation is the reference's greedy one
        kl = (lr.exp() * (lr - lm)).sum(-1)
        assert kl.mean().item() == pytest.approx(p["kl_mean"], rel=1e-3, abs=1e-6)
        assert (lr.argmax(-1) == lm.argmax(-1)).float().mean().item() == pytest.approx(p["top1_agreement"])


def _logits(model, ids: list[int]) -> torch.Tensor:
    r = PagedRunner(model)
    return r.step([(r.new_seq(), ids)])[0]


def test_bad_flags_name_the_flag(default_ckpt, tmp_path, capsys):
    assert validate_cli.main(["--model", str(tmp_path), "--reference", str(default_ckpt)]) == 2
    assert capsys.readouterr().err.startswith("qnext-validate: --model:")
    assert validate_cli.main(["--model", str(default_ckpt), "--reference", str(default_ckpt),
                              "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("qnext-validate: --max-new-tokens:")
    (tmp_path / "empty.txt").write_text("\n")
    assert validate_cli.main(["--model", str(default_ckpt), "--reference", str(default_ckpt),
                              "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert capsys.readouterr().err.startswith("qnext-validate: --prompts:")
