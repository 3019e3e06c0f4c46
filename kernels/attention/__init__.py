from kernels.attention.reference import paged_attention_varlen

__all__ = ["paged_attention_varlen"]
