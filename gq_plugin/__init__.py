"""gq-plugin: turn Gaussian VAEs into VQ-VAEs with Gaussian Quant (GQ) and the Target
Divergence Constraint (TDC) of "Vector Quantization using Gaussian Variational Autoencoder"
(arXiv 2512.06609).

>>> from gq_plugin import GaussianQuantizer
>>> q = GaussianQuantizer(dim=16, codebook_size=2**16, codebook_dim=16, accept_image_fmap=True)
"""

from .codebook import codebook_fingerprint, group_channels, group_index_map, make_codebook, ungroup_channels
from .quantizer import CodebookUsage, GaussianQuantizer, GQConfig, codebook_usage
from .rate import (
    BandStats,
    RateStats,
    band_statistics,
    bits_per_pixel,
    bits_per_token,
    group_rates,
    kl_bits_per_channel,
    rate_statistics,
    recommend_codebook,
)
from .search import available_backends, gq_search, search_reference
from .tdc import TargetDivergenceConstraint, TDCSettings

__version__ = "0.1.0"

__all__ = [
    "GaussianQuantizer",
    "GQConfig",
    "TargetDivergenceConstraint",
    "TDCSettings",
    "CodebookUsage",
    "codebook_usage",
    "make_codebook",
    "codebook_fingerprint",
    "group_channels",
    "ungroup_channels",
    "group_index_map",
    "kl_bits_per_channel",
    "group_rates",
    "rate_statistics",
    "RateStats",
    "band_statistics",
    "BandStats",
    "recommend_codebook",
    "bits_per_token",
    "bits_per_pixel",
    "gq_search",
    "search_reference",
    "available_backends",
]
