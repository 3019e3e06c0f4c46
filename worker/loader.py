"""Checkpoint directory (hub layout) -> Qwen3NextForCausalLM on a device.

- Sharded safetensors through `model.safetensors.index.json`, or a single `model.safetensors`.
- Hub tensor names: per-expert `mlp.experts.E.{gate,up,down}_proj.weight` are stacked into our
  `experts.w_{gate,up,down}`; `mtp.*` fills the MTP head.
- BF16 or fine-grained FP8 (e4m3 weight + fp32 `weight_scale_inv` per 128x128 block). FP8 stays FP8 on CUDA
  (`worker/fp8.py`); elsewhere it is dequantized once, here, to the model dtype.
- Every tensor is checked against what the model expects from the headers alone, before anything is read:
  a missing, surplus, mis-shaped or wrongly typed tensor is an error that names it.
- Shards are read one tensor at a time from memory-mapped files, so host memory peaks at about one tensor
  (plus an FP8 weight waiting for its scale).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qnext.kernels.fp8 import dequantize_weight_block
from qnext.kernels.fp8.reference import FP8_DTYPE
from qnext.worker.config import ModelConfig, load_config
from qnext.worker.cpu_linear import pack_linears, packing_works
from qnext.worker.dtype_choice import choose_dtype
from qnext.worker.fp8 import Fp8Linear, apply_fp8, experts_are_quantized, is_quantized_linear
from qnext.worker.model import Experts, Qwen3NextForCausalLM, RotaryEmbedding
from qnext.worker.parallel import TensorShard, add_all_reduce_hooks, check_fp8_blocks, shard_config

_FLOAT_DTYPES = {"BF16", "F16", "F32"}
_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\."
                        r"(?P<what>weight|weight_scale_inv)$")


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config.json describes."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str  # "float" (bf16/fp16/fp32), "fp8" (float8_e4m3fn), "scale" (fp32 block scales)


class CheckpointFiles:
    """Names, shapes and dtypes of every tensor of a checkpoint directory, from the safetensors headers."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            self.shards = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            self.shards = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.dir}: neither model.safetensors.index.json nor model.safetensors found")
        self.header: dict[str, tuple[tuple[int, ...], str, str]] = {}  # name -> (shape, dtype, shard)
        for shard in self.shards:
            path = self.dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the index is missing")
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.header[name] = (tuple(sl.get_shape()), sl.get_dtype(), shard)
        if index.is_file():
            for name, shard in weight_map.items():
                if name not in self.header or self.header[name][2] != shard:
                    raise CheckpointError(f"{name}: the index puts it in {shard}, but that shard does not hold it")

    @property
    def has_mtp(self) -> bool:
        return any(n.startswith("mtp.") for n in self.header)


def _blocks(n: int) -> int:
    return -(-n // 128)


def expected_tensors(model: Qwen3NextForCausalLM, cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Checkpoint tensor name -> spec, derived from the built model and the config's quantization."""
    quant = cfg.quant
    out: dict[str, TensorSpec] = {}

    def add_weight(name: str, shape: tuple[int, ...], fp8: bool) -> None:
        out[name + ".weight"] = TensorSpec(shape, "fp8" if fp8 else "float")
        if fp8:
            out[name + ".weight_scale_inv"] = TensorSpec((_blocks(shape[0]), _blocks(shape[1])), "scale")

    for mod_name, module in model.named_modules():
        if isinstance(module, Experts):
            fp8 = quant is not None and experts_are_quantized(mod_name, quant)
            E = module.w_gate.shape[0]
            for proj in ("gate", "up", "down"):
                shape = tuple(getattr(module, f"w_{proj}").shape[1:])
                for e in range(E):
                    add_weight(f"{mod_name}.{e}.{proj}_proj", shape, fp8)
        elif isinstance(module, (nn.Linear, Fp8Linear)):
            if mod_name == "lm_head" and cfg.tie_word_embeddings:
                continue
            fp8 = quant is not None and is_quantized_linear(module, mod_name, quant)
            add_weight(mod_name, (module.out_features, module.in_features), fp8)
            if isinstance(module, nn.Linear) and module.bias is not None:
                out[mod_name + ".bias"] = TensorSpec(tuple(module.bias.shape), "float")
        elif mod_name and not isinstance(module, (RotaryEmbedding,)):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{mod_name}.{pname}"] = TensorSpec(tuple(p.shape), "float")
    return out


def _kind_ok(kind: str, dtype: str) -> bool:
    return {"float": dtype in _FLOAT_DTYPES, "fp8": dtype == "F8_E4M3", "scale": dtype == "F32"}[kind]


def validate(expected: dict[str, TensorSpec], ckpt: CheckpointFiles) -> None:
    found = ckpt.header
    missing = sorted(set(expected) - set(found))
    surplus = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if surplus:
        problems.append(f"{len(surplus)} unexpected tensor(s): {', '.join(surplus[:8])}"
                        + (" ..." if len(surplus) > 8 else ""))
    for name, spec in expected.items():
        if name not in found:
            continue
        shape, dtype, shard = found[name]
        if shape != spec.shape:
            problems.append(f"{name}: shape {list(shape)} in {shard}, expected {list(spec.shape)}")
        elif not _kind_ok(spec.kind, dtype):
            problems.append(f"{name}: dtype {dtype} in {shard}, expected {spec.kind}")
    if problems:
        raise CheckpointError(f"{ckpt.dir}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))


def _target(model: nn.Module, name: str) -> torch.Tensor:
    """Checkpoint name -> destination tensor. A per-expert tensor maps to one row of the stacked parameter."""
    m = _EXPERT_RE.match(name)
    if m:
        suffix = "_scale_inv" if m["what"] == "weight_scale_inv" else ""
        return model.get_parameter(f"{m['prefix']}.w_{m['proj']}{suffix}").data[int(m["e"])]
    return model.get_parameter(name).data


def _base_name(name: str) -> str:
    return name[: -len(".weight_scale_inv")] if name.endswith(".weight_scale_inv") else name[: -len(".weight")]


def load_weights(model: Qwen3NextForCausalLM, ckpt: CheckpointFiles, expected: dict[str, TensorSpec],
                 tp_shard: TensorShard | None = None) -> None:
    """Stream every tensor into its parameter. FP8 tensors whose destination is not FP8 are dequantized.
    With a tensor-parallel `tp_shard`, only this rank's slice of each tensor is read."""
    pending: dict[str, dict[str, torch.Tensor]] = {}  # FP8 weight waiting for its scale (or vice versa)
    loaded: set[str] = set()
    for shard in ckpt.shards:
        with safe_open(ckpt.dir / shard, framework="pt", device="cpu") as f:
            for name in f.keys():
                spec = expected[name]
                value = tp_shard.read(f, name) if tp_shard is not None else f.get_tensor(name)
                base = _base_name(name) if spec.kind != "float" else name
                if spec.kind != "float" and _target(model, base + ".weight").dtype != FP8_DTYPE:
                    # FP8 in the checkpoint, not on this device: dequantize once both halves have arrived.
                    parts = pending.setdefault(base, {})
                    parts[spec.kind] = value
                    if len(parts) == 2:
                        w_dest = _target(model, base + ".weight")
                        w_dest.copy_(dequantize_weight_block(parts["fp8"], parts["scale"]).to(w_dest.dtype))
                        del pending[base]
                else:
                    dest = _target(model, name)  # kept as stored (FP8 on CUDA) or cast (bf16 -> fp32 on CPU)
                    dest.copy_(value.to(dest.dtype))
                loaded.add(name)
    assert not pending, f"unpaired FP8 tensors: {sorted(pending)}"
    assert loaded == set(expected), "validate() should have caught this"


def load_model(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               keep_fp8: bool | None = None, tp_rank: int = 0, tp_size: int = 1) -> Qwen3NextForCausalLM:
    """Build and load the model. dtype: None = `--dtype auto` (worker/dtype_choice.py).
    keep_fp8: None = keep FP8 weights as FP8 on CUDA, dequantize elsewhere.
    tp_size > 1: rank `tp_rank`'s part of a tensor-parallel model (`worker/parallel.py`), whose row-parallel
    outputs are all-reduced over the default process group."""
    device = torch.device(device)
    ckpt = CheckpointFiles(model_dir)
    cfg = load_config(model_dir, has_mtp_tensors=ckpt.has_mtp)
    if dtype is None:
        dtype = choose_dtype("auto", cfg.torch_dtype, device)[0]
    if keep_fp8 is None:
        keep_fp8 = device.type == "cuda"
    keep_fp8 = keep_fp8 and cfg.quant is not None
    shard = TensorShard(cfg, tp_rank, tp_size) if tp_size > 1 else None
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(shard_config(cfg, tp_size)).to(dtype)
        full = model if shard is None else Qwen3NextForCausalLM(cfg)  # the checkpoint's shapes, for validate
    expected = expected_tensors(full, cfg)  # before apply_fp8: which tensors are FP8 depends on names only
    if keep_fp8:
        apply_fp8(model, cfg.quant)
    validate(expected, ckpt)
    if shard is not None:
        check_fp8_blocks([shard], {n: ckpt.header[n][0] for n, s in expected.items() if s.kind == "fp8"})
    model.to_empty(device=device)
    model.requires_grad_(False)
    load_weights(model, ckpt, expected, shard)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)  # its buffer was on meta; compute it for real
    if device.type == "cpu" and shard is None and packing_works(dtype):
        pack_linears(model)  # bf16 on a CPU: weights packed once for oneDNN (worker/cpu_linear.py)
    if shard is not None:
        add_all_reduce_hooks(model)
    return model.eval()
