"""Fused Triton kernels with their PyTorch references; each module falls back to the reference without Triton."""
