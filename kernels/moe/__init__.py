from kernels.moe.reference import fused_moe, route

__all__ = ["route", "fused_moe"]
