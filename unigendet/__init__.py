"""unigendet: fused kernels, model and training for UniGenDet.

Importing the package is cheap: it touches neither CUDA nor Triton and does not load the compiled
extension. Use ``python -m unigendet.info`` to see which fast paths are live.
"""

__version__ = "0.1.0"

from ._backend import BackendUnavailableError  # noqa: E402

__all__ = ["BackendUnavailableError", "__version__"]
