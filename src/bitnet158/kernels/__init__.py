"""Ternary linear kernels. Every backend computes what `reference.ternary_linear` computes."""

from bitnet158.kernels.reference import ternary_linear, ternary_matmul

__all__ = ["ternary_linear", "ternary_matmul"]
