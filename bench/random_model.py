"""Qwen3-Next models with random weights built directly on the device, for benchmarks that need the real shape
but no checkpoint: writing and loading the 80 GB FP8 model would eat a short GPU session (and cannot be
downloaded here), and a step's cost depends on the shapes, not on the values.

- `random_config`: config.json at the real per-layer dimensions (or worker/tiny.py's with `small`), any depth,
  vocabulary, FP8 block-128 (the real FP8 checkpoint's quantization_config) and MTP head.
- `build_random_model`: built as worker/loader.py builds a model (meta -> dtype -> FP8 swap -> to_empty), then
  filled in the spirit of worker/tiny.py's random weights.
- `MtpAlignment`: switches the weights, in place and reversibly, to the arrangement of
  worker.tiny.align_mtp_with_target, under which the MTP head drafts exactly the target's next token (every draft
  accepted: the upper bound of speculative decoding) at an unchanged cost per step.
"""

from __future__ import annotations

import torch

# The real model's per-layer dimensions (docs: hidden 2048; attention 16 q / 2 kv heads of 256; Gated DeltaNet 16
# key / 32 value heads of 128, conv kernel 4; 512 experts top-10, moe_intermediate 512, shared expert 512), in
# config.json field names.
REAL_DIMS = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                 linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                 linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10,
                 moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
                 partial_rotary_factor=0.25, rope_theta=10000000, max_position_embeddings=262144)
REAL_LAYERS, REAL_VOCAB = 48, 151936


def random_config(layers: int, vocab: int, fp8: bool, mtp: bool, small: bool = False):
    """(raw config.json dict, ModelConfig). Every 4th layer is full attention, as in the real model."""
    from qnext.worker.config import config_from_dict
    from qnext.worker.tiny import modules_not_converted, tiny_config
    raw = tiny_config(vocab_size=vocab, num_hidden_layers=layers, **({} if small else REAL_DIMS))
    cfg = config_from_dict(raw, has_mtp_tensors=mtp)
    if fp8:  # what make_checkpoint(..., fp8=True) writes, i.e. the real FP8 checkpoint's
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128],
                                      "modules_to_not_convert": modules_not_converted(cfg, with_mtp=mtp)}
        cfg = config_from_dict(raw, has_mtp_tensors=mtp)
    return raw, cfg


@torch.no_grad()
def init_(name: str, p: torch.Tensor, scales: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """One parameter's random values (same scales as worker/tiny.py's random_weights), drawn on its device."""
    from qnext.kernels.fp8.reference import FP8_DTYPE

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, device=p.device, generator=gen)

    if name.endswith("_scale_inv"):
        return  # set with its weight
    if p.dtype == FP8_DTYPE:
        # fp8 values ~N(0, 1) (e4m3 holds +-448) and every block scale = the std the weight should have
        std = p.shape[-1] ** -0.5
        for chunk in p.view(-1, p.shape[-1]).split(1 << 14):  # bounded temporary memory
            chunk.copy_(randn(chunk.shape).to(FP8_DTYPE))
        scales[name + "_scale_inv" if name.endswith(("w_gate", "w_up", "w_down")) else
               name[:-len("weight")] + "weight_scale_inv"].fill_(std)
    elif name.endswith("A_log"):  # decay rates A in [1, 16) as the real init
        p.copy_(torch.log(1 + 15 * torch.rand(p.shape, device=p.device, generator=gen)))
    elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
        p.copy_(1 + 0.1 * randn(p.shape))
    elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):  # zero-centred RMSNorm: 1 + w
        p.copy_(0.1 * randn(p.shape))
    elif name.endswith("conv1d.weight"):
        p.copy_(0.5 * randn(p.shape))
    elif name.endswith("embed_tokens.weight"):
        p.copy_(randn(p.shape))
    elif name.endswith("bias"):
        p.zero_()
    else:  # projections and bf16 expert stacks: std 1/sqrt(fan_in), fan_in = last dim, drawn in slices
        for chunk in p.view(-1, p.shape[-1]).split(1 << 14):
            chunk.copy_(randn(chunk.shape) * p.shape[-1] ** -0.5)


def build_random_model(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """As worker/loader.py load_model builds it (meta -> dtype -> FP8 swap -> to_empty), then random values."""
    from qnext.worker.fp8 import apply_fp8
    from qnext.worker.model import Qwen3NextForCausalLM, RotaryEmbedding
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg).to(dtype)
    if cfg.quant is not None:
        apply_fp8(model, cfg.quant)
    model.to_empty(device=device)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    scales = {n: p for n, p in params.items() if n.endswith("_scale_inv")}
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in params.items():
        init_(name, p, scales, gen)
    model.rotary = RotaryEmbedding(cfg).to(device)  # its buffer was on meta
    return model.eval()


class MtpAlignment:
    """qnext.worker.tiny.align_mtp_with_target on a built model, undoable: every layer's output projection gives zero
    (o_proj, out_proj, the experts' and shared expert's down projections; for FP8 weights their block scales are
    zeroed, so the kernels still read and multiply every byte), every RMSNorm weight except the gated norm is 0
    (scale 1), and mtp.fc passes the embedding half through. The target then predicts from the current token
    alone and the MTP head, fed the next token, predicts the target's next prediction."""

    _OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "w_down", "o_proj.weight_scale_inv",
                "out_proj.weight_scale_inv", "down_proj.weight_scale_inv", "w_down_scale_inv")

    def __init__(self, model) -> None:
        from qnext.kernels.fp8.reference import FP8_DTYPE
        params = dict(model.named_parameters())
        self.targets: dict[str, torch.Tensor] = {}
        for n, p in params.items():
            if n.endswith(self._OUTPUTS):
                fp8_weight = n + "_scale_inv" in params or n[:-len("weight")] + "weight_scale_inv" in params
                if p.dtype != FP8_DTYPE and not fp8_weight:  # bf16 weight, or the scale of an FP8 one
                    self.targets[n] = p
            elif "norm" in n and "linear_attn.norm" not in n:
                self.targets[n] = p
        self.fc = params["mtp.fc.weight"] if "mtp.fc.weight" in params else None
        self.saved: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def align(self) -> None:
        assert self.saved is None, "already aligned"
        saved = {n: p.clone() for n, p in self.targets.items()}  # small: norms, scales, bf16 output projections
        for p in self.targets.values():
            p.zero_()
        if self.fc is not None:
            saved["mtp.fc.weight"] = self.fc.clone()
            hidden = self.fc.shape[0]
            self.fc.zero_()
            self.fc[:, :hidden] = torch.eye(hidden, dtype=self.fc.dtype, device=self.fc.device)
        self.saved = saved

    @torch.no_grad()
    def restore(self) -> None:
        assert self.saved is not None, "not aligned"
        for n, p in self.targets.items():
            p.copy_(self.saved[n])
        if self.fc is not None:
            self.fc.copy_(self.saved["mtp.fc.weight"])
        self.saved = None
