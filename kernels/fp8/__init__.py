from kernels.fp8.reference import (dequantize_weight_block, fp8_block_linear, per_token_group_quant,
                                   quantize_weight_block)

__all__ = ["fp8_block_linear", "per_token_group_quant", "quantize_weight_block", "dequantize_weight_block"]
