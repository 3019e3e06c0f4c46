import re

import pytest

from qnext.worker.config import FULL_ATTENTION, LINEAR_ATTENTION, config_from_dict

HUB_INSTRUCT = {  # docs/model.md §1, the hub's raw config.json of Qwen3-Next-80B-A3B-Instruct
    "architectures": ["Qwen3NextForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4, "head_dim": 256,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512, "norm_topk_prob": True,
    "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48,
    "num_key_value_heads": 2, "output_router_logits": False, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000000, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_hub_config_of_the_real_model():
    cfg = config_from_dict(HUB_INSTRUCT, has_mtp_tensors=True)
    assert cfg.full_attention_layers == list(range(3, 48, 4))
    assert len(cfg.linear_attention_layers) == 36
    assert cfg.rotary_dim == 64 and cfg.rope.theta == 1e7 and cfg.rope.yarn_factor is None
    assert cfg.conv_dim == 8192 and cfg.num_mtp_layers == 1 and cfg.eos_token_ids == (151645,)
    assert all(cfg.is_moe_layer(i) for i in range(48))
    assert cfg.extra["transformers_version"] == "4.57.0.dev0"  # unknown fields are kept
    assert config_from_dict(HUB_INSTRUCT).num_mtp_layers == 0  # no mtp.* tensors, no count -> no MTP


def test_rope_parameters_spelling_equals_hub_spelling():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    hub = dict(HUB_INSTRUCT, rope_scaling=yarn)
    v5 = {k: v for k, v in HUB_INSTRUCT.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling")}
    v5["rope_parameters"] = dict(yarn, rope_theta=10000000, partial_rotary_factor=0.25)
    assert config_from_dict(hub).rope == config_from_dict(v5).rope
    assert config_from_dict(hub).rope.yarn_factor == 4.0


def test_explicit_layer_types_mtp_count_and_fp8():
    raw = dict(HUB_INSTRUCT, num_hidden_layers=3, layer_types=[FULL_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION],
               num_nextn_predict_layers=2, mlp_only_layers=[1],
               quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "mtp.fc"]})
    cfg = config_from_dict(raw)
    assert cfg.full_attention_layers == [0, 2] and cfg.num_mtp_layers == 2 and not cfg.is_moe_layer(1)
    assert cfg.quant.block_size == (128, 128)
    assert not cfg.quant.is_quantized("lm_head") and cfg.quant.is_quantized("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen3"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"linear_num_value_heads": 24}, "linear_num_value_heads"),
    ({"layer_types": ["full_attention"] * 5}, "layer_types"),
    ({"layer_types": ["sliding"] * 48}, "layer_types[0]"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"num_experts_per_tok": 513}, "num_experts_per_tok"),
    ({"mlp_only_layers": [48]}, "mlp_only_layers"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.original_max_position_embeddings"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
     "quantization_config.weight_block_size"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
])
def test_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match="config.json: " + re.escape(field) + ":"):
        config_from_dict(dict(HUB_INSTRUCT, **change))
