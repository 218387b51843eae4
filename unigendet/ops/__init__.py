"""Fused ops. Each op lives in its own module with its pure-PyTorch reference beside it."""
