"""Routes for other models to run on the fused attention without rewriting their attention code.

``unigendet.integrations.transformers``
    registers ``attn_implementation="unigendet"`` with Hugging Face transformers (importing the module
    registers it; :func:`~unigendet.integrations.transformers.register` does it explicitly).
``unigendet.integrations.flash_attn``
    ``flash_attn_varlen_func`` / ``flash_attn_func`` with flash-attn 2's signatures, for code written
    against flash-attn.

Importing this package imports neither transformers nor the kernels.
"""
