from kernels.conv1d.reference import causal_conv1d_varlen

__all__ = ["causal_conv1d_varlen"]
