from kernels.gated_delta_rule.reference import gated_delta_rule_varlen

__all__ = ["gated_delta_rule_varlen"]
