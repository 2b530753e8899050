"""Baseline quantizers (vector-quantize-pytorch VQ/FSQ/LFQ/BSQ, TokenBridge) behind one API:
``q(z[B, C, H, W]) -> (z_q, indices, aux_loss)`` with ``codebook_size`` and ``bits_per_token``.
Build them by name with :func:`gq_plugin.lab.registry.build_quantizer`."""

from .tokenbridge import TokenBridgeQuantizer, tokenbridge_tables
from .vqp import FSQ_LEVELS, BaselineQuantizer, FSQBaseline, LFQBaseline, TokenBridgeBaseline, VQBaseline

__all__ = [
    "TokenBridgeQuantizer",
    "tokenbridge_tables",
    "BaselineQuantizer",
    "VQBaseline",
    "FSQBaseline",
    "LFQBaseline",
    "TokenBridgeBaseline",
    "FSQ_LEVELS",
]
