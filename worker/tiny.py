"""The embedded default: a tiny random Qwen3-Next checkpoint in the exact hub layout.

Same file set as the real model (config.json, sharded safetensors + index, hub tensor names with per-expert
weights and `mtp.*`, tokenizer.json / tokenizer_config.json with the real Qwen vocabulary and chat template,
generation_config.json), an FP8 block-128 variant produced by a real quantiser, and dimensions small enough
for a CPU but not degenerate (several experts per token, 2 value heads per key head, 2 full-attention
layers, non-zero norm weights). Generated deterministically from a seed, on first use, into a cache dir.

    qnext-make-tiny OUT_DIR [--fp8] [--thinking] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qnext.kernels.fp8 import quantize_weight_block
from qnext.worker.cli_help import HelpFormatter
from qnext.worker.config import FULL_ATTENTION, ModelConfig, config_from_dict
from qnext.worker.tokenizer_files import ENDOFTEXT_ID, IM_END_ID, VOCAB_SIZE, write_tokenizer_files

# Bump when the generated content changes, so stale cached copies are not reused.
TINY_VERSION = 1


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """config.json of the embedded default, in the hub's field names (docs/model.md §1), scaled down."""
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "decoder_sparse_step": 1,
        "full_attention_interval": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_value_head_dim": 32,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 8,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 64,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }
    cfg.update(overrides)
    return cfg


def _layer_tensors(cfg: ModelConfig, prefix: str, layer_type: str, is_moe: bool,
                   rand: Any) -> dict[str, torch.Tensor]:
    """Hub-named tensors of one decoder layer. rand(shape, std) draws from the shared generator."""
    H = cfg.hidden_size
    t: dict[str, torch.Tensor] = {
        f"{prefix}.input_layernorm.weight": rand((H,), 0.1),
        f"{prefix}.post_attention_layernorm.weight": rand((H,), 0.1),
    }
    if layer_type == FULL_ATTENTION:
        a = f"{prefix}.self_attn"
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        t |= {f"{a}.q_proj.weight": rand((2 * q_out, H), H ** -0.5),
              f"{a}.k_proj.weight": rand((kv_out, H), H ** -0.5),
              f"{a}.v_proj.weight": rand((kv_out, H), H ** -0.5),
              f"{a}.o_proj.weight": rand((H, q_out), q_out ** -0.5),
              f"{a}.q_norm.weight": rand((cfg.head_dim,), 0.1),
              f"{a}.k_norm.weight": rand((cfg.head_dim,), 0.1)}
    else:
        a = f"{prefix}.linear_attn"
        Hv = cfg.linear_num_value_heads
        t |= {f"{a}.in_proj_qkvz.weight": rand((2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim, H), H ** -0.5),
              f"{a}.in_proj_ba.weight": rand((2 * Hv, H), H ** -0.5),
              f"{a}.conv1d.weight": rand((cfg.conv_dim, 1, cfg.linear_conv_kernel_dim), 0.5),
              # decay rates A in [1, 16) as the real init; dt_bias around 1
              f"{a}.A_log": torch.log(1 + 15 * rand((Hv,), 1.0).abs().clamp(max=1)),
              f"{a}.dt_bias": 1 + rand((Hv,), 0.1),
              f"{a}.norm.weight": 1 + rand((cfg.linear_value_head_dim,), 0.1),
              f"{a}.out_proj.weight": rand((H, cfg.linear_value_dim), cfg.linear_value_dim ** -0.5)}
    m = f"{prefix}.mlp"
    if is_moe:
        inter, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        t[f"{m}.gate.weight"] = rand((cfg.num_experts, H), H ** -0.5)
        for e in range(cfg.num_experts):
            t |= {f"{m}.experts.{e}.gate_proj.weight": rand((inter, H), H ** -0.5),
                  f"{m}.experts.{e}.up_proj.weight": rand((inter, H), H ** -0.5),
                  f"{m}.experts.{e}.down_proj.weight": rand((H, inter), inter ** -0.5)}
        t |= {f"{m}.shared_expert.gate_proj.weight": rand((shared, H), H ** -0.5),
              f"{m}.shared_expert.up_proj.weight": rand((shared, H), H ** -0.5),
              f"{m}.shared_expert.down_proj.weight": rand((H, shared), shared ** -0.5),
              f"{m}.shared_expert_gate.weight": rand((1, H), H ** -0.5)}
    else:
        inter = cfg.intermediate_size
        t |= {f"{m}.gate_proj.weight": rand((inter, H), H ** -0.5),
              f"{m}.up_proj.weight": rand((inter, H), H ** -0.5),
              f"{m}.down_proj.weight": rand((H, inter), inter ** -0.5)}
    return t


def random_weights(cfg: ModelConfig, seed: int, with_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its hub name, fp32, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    H, V = cfg.hidden_size, cfg.vocab_size
    t = {"model.embed_tokens.weight": rand((V, H), 1.0),
         "model.norm.weight": rand((H,), 0.1),
         "lm_head.weight": rand((V, H), H ** -0.5)}
    for i, lt in enumerate(cfg.layer_types):
        t |= _layer_tensors(cfg, f"model.layers.{i}", lt, cfg.is_moe_layer(i), rand)
    if with_mtp:
        t |= {"mtp.fc.weight": rand((H, 2 * H), (2 * H) ** -0.5),
              "mtp.pre_fc_norm_embedding.weight": rand((H,), 0.1),
              "mtp.pre_fc_norm_hidden.weight": rand((H,), 0.1),
              "mtp.norm.weight": rand((H,), 0.1)}
        t |= _layer_tensors(cfg, "mtp.layers.0", FULL_ATTENTION, cfg.num_experts > 0, rand)
    return t


def modules_not_converted(cfg: ModelConfig, with_mtp: bool) -> list[str]:
    """The real FP8 checkpoint's `modules_to_not_convert` pattern (docs/model.md §8) for this config."""
    out = ["lm_head"]
    for i, lt in enumerate(cfg.layer_types):
        p = f"model.layers.{i}"
        out += [f"{p}.input_layernorm", f"{p}.mlp.gate", f"{p}.mlp.shared_expert_gate",
                f"{p}.post_attention_layernorm"]
        if lt == FULL_ATTENTION:
            out += [f"{p}.self_attn.k_norm", f"{p}.self_attn.q_norm"]
        else:
            out += [f"{p}.linear_attn.{n}" for n in ("A_log", "conv1d", "dt_bias", "in_proj_ba", "norm")]
    if with_mtp:
        p = "mtp.layers.0"
        out += ["mtp.fc", f"{p}.input_layernorm", f"{p}.mlp.gate", f"{p}.mlp.shared_expert_gate",
                f"{p}.post_attention_layernorm", f"{p}.self_attn.k_norm", f"{p}.self_attn.q_norm",
                "mtp.norm", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden"]
    return sorted(out)


def quantize_fp8(tensors: dict[str, torch.Tensor], not_converted: list[str]) -> dict[str, torch.Tensor]:
    """Linear weights outside `not_converted` -> float8_e4m3fn + fp32 weight_scale_inv (128x128 blocks)."""
    out: dict[str, torch.Tensor] = {}
    skip = set(not_converted)
    for name, w in tensors.items():
        module = name.rsplit(".", 1)[0]
        is_linear = name.endswith(".weight") and w.dim() == 2 and "embed_tokens" not in name
        if is_linear and module not in skip:
            out[name], out[module + ".weight_scale_inv"] = quantize_weight_block(w)
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, as the hub lays them out."""
    names = list(tensors)
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(num_shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out_dir / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_checkpoint(out_dir: str | Path, config: dict[str, Any] | None = None, *, seed: int = 0,
                    fp8: bool = False, with_mtp: bool = True, num_shards: int = 3, thinking: bool = False,
                    tokenizer: bool = True) -> Path:
    """Write a complete checkpoint directory; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = dict(config or tiny_config())
    cfg = config_from_dict(raw, has_mtp_tensors=with_mtp)
    tensors = random_weights(cfg, seed, with_mtp)
    if fp8:
        not_converted = modules_not_converted(cfg, with_mtp)
        tensors = quantize_fp8(tensors, not_converted)
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128], "modules_to_not_convert": not_converted}
    else:
        tensors = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    save_sharded(tensors, out, num_shards)
    with open(out / "config.json", "w") as f:
        json.dump(raw, f, indent=2)
    if tokenizer:
        write_tokenizer_files(out, thinking=thinking)
    return out


def align_mtp_with_target(model_dir: str | Path) -> None:
    """Rewrite a checkpoint's weights in place so its MTP head drafts exactly the target's next prediction
    (every speculative draft is then accepted: the upper bound of MTP, and the multi-accept paths in tests).

    Every layer's output projection is zeroed (each layer adds nothing), all RMSNorm weights are zeroed (scale
    1), and mtp.fc passes the embedding half through. The target then predicts g(t) = argmax
    lm_head(norm(embed(t))) from the current token alone, and the MTP, fed t_{p+1}, predicts g(t_{p+1}): the
    target's prediction one step ahead."""
    model_dir = Path(model_dir)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    for shard in sorted(model_dir.glob("*.safetensors")):
        t = load_file(shard)
        for n in t:
            if n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                t[n] = torch.zeros_like(t[n])
            elif "norm" in n and "linear_attn.norm" not in n:
                t[n] = torch.zeros_like(t[n])
            elif n == "mtp.fc.weight":
                t[n] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1).to(t[n].dtype)
        save_file(t, shard, metadata={"format": "pt"})


def cache_root() -> Path:
    base = os.environ.get("QNEXT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qnext")
    return Path(base)


def default_checkpoint(fp8: bool = False, thinking: bool = False) -> Path:
    """The embedded default, generated once into the cache dir (atomically, so concurrent first uses agree)."""
    name = f"tiny-v{TINY_VERSION}-{'fp8' if fp8 else 'bf16'}-{'thinking' if thinking else 'instruct'}"
    final = cache_root() / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=final.parent))
    try:
        make_checkpoint(tmp, fp8=fp8, thinking=thinking)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # lost a race only if someone else finished
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="qnext-make-tiny", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    p.add_argument("--fp8", action="store_true", help="fine-grained FP8 (e4m3, 128x128 blocks) variant")
    p.add_argument("--thinking", action="store_true", help="Thinking-model chat template and generation config")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = p.parse_args(argv)
    path = make_checkpoint(args.out_dir, seed=args.seed, fp8=args.fp8, thinking=args.thinking)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
