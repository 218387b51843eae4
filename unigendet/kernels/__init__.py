"""Triton device code of unigendet (``unigendet.kernels``).

Only ``@triton.jit`` functions, static config lists and ``tl`` helpers live here: nothing in this
package queries a driver or CUDA when imported, so it imports on CPU-only machines too.
"""
