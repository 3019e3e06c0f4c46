"""The embedded default checkpoint: real hub layout, deterministic, loadable, with the real tokenizer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from safetensors import safe_open

from qnext.worker.config import load_config
from qnext.worker.loader import load_model
from qnext.worker.tiny import default_checkpoint, make_checkpoint, tiny_config


def test_default_checkpoint_layout(default_ckpt):
    d = default_ckpt
    assert default_checkpoint() == d  # generated once, then reused
    files = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "model-00001-of-00003.safetensors"} <= files
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.0.mlp.experts.15.down_proj.weight" in names and "mtp.layers.0.self_attn.q_proj.weight" in names
    assert "mtp.fc.weight" in names and "lm_head.weight" in names
    size = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(d / shard, "pt") as f:
            for n in f.keys():
                assert index["weight_map"][n] == shard
                sl = f.get_slice(n)
                assert sl.get_dtype() == "BF16"
                size += 2 * eval("*".join(map(str, sl.get_shape())) or "1")
    assert index["metadata"]["total_size"] == size
    cfg = load_config(d, has_mtp_tensors=True)
    # not degenerate: several experts per token, 2 value heads per key head, >= 2 full-attention layers
    assert cfg.num_experts_per_tok >= 2 and cfg.linear_num_value_heads == 2 * cfg.linear_num_key_heads
    assert len(cfg.full_attention_layers) >= 2 and cfg.vocab_size == 151936
    model = load_model(d)
    norms = model.model.layers[0].input_layernorm.weight
    assert norms.abs().sum() > 0  # norm weights are not all zero


def test_make_tiny_is_deterministic_and_cli_writes_fp8(tmp_path):
    small = tiny_config(vocab_size=256)

    def digest(d):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.glob("*.safetensors")))).hexdigest()

    a = make_checkpoint(tmp_path / "a", small, seed=7, tokenizer=False)
    b = make_checkpoint(tmp_path / "b", small, seed=7, tokenizer=False)
    c = make_checkpoint(tmp_path / "c", small, seed=8, tokenizer=False)
    assert digest(a) == digest(b) != digest(c)
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "qnext.worker.tiny", str(out), "--fp8"], check=True, capture_output=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert "lm_head" in cfg["quantization_config"]["modules_to_not_convert"]
    load_model(out)  # the FP8 variant loads (dequantized on CPU)
