from kernels.norms.reference import gated_rms_norm, rms_norm_zero_centred

__all__ = ["rms_norm_zero_centred", "gated_rms_norm"]
