"""A posterior object whose ``sample``/``mode``/``kl`` follow Gaussian Quant + TDC.

Shared by the diffusers and ldm adapters. It holds no GQ math: rates, the TDC loss and the
GQ search all come from the attached :class:`~gq_plugin.GaussianQuantizer`.

Behaviour (the quantizer's ``training`` flag, i.e. the host model's ``train()``/``eval()``):

================  =====================================  ==========================================
method            training                               eval
================  =====================================  ==========================================
``sample(gen)``   ``mean + std * eps`` (reparameterised)  GQ codeword latent ``z_hat``
``mode()``        ``mean``                               ``z_hat``
``kl()``          per-sample TDC loss ``(B,)``; records   per-sample TDC loss ``(B,)`` (no statistics
                  the rate statistics and (with            recorded, multipliers untouched)
                  ``tdc_auto_step``) moves the
                  multipliers -- once per posterior
``indices``       GQ indices (computed on demand)        GQ indices
================  =====================================  ==========================================

Index layout: the core's indices are channel-last ``(B, h, w, G)``; diffusers and ldm hold
latents channel-first ``(B, C, h, w)``, so their adapters show indices (and rates) as
``(B, G, h, w)``, lined up with the latent, and convert in exactly one place:
:func:`to_host_layout` / :func:`from_host_layout` (the ``.gqt`` token files store this layout).

``kl().mean()`` (equivalently ``kl().sum() / B``, the reduction used by the diffusers
``train_autoencoderkl.py`` example and by ldm's ``LPIPSWithDiscriminator``) equals the TDC loss
``lam * mean over batch of sum over tokens and groups of w * R_g`` times ``kl_scale()`` when the
adapter gives one: hosts multiply ``kl()`` by their own KL weight (ldm: ``kl_weight = 1e-6``), so
an adapter that can see that weight passes ``kl_scale = tdc_weight / host_weight`` and the host's
loss receives ``tdc_weight * TDC``. ``tdc_loss()`` is the unscaled TDC loss.
"""

from __future__ import annotations

import math

import torch

from ..rate import LOGVAR_RANGE, reparameterize
from . import _layout


def to_host_layout(core: torch.Tensor) -> torch.Tensor:
    """Core ``(B, h, w, G)`` -> channel-first host ``(B, G, h, w)`` (indices or rates)."""
    return _layout.to_host_layout(core)


def from_host_layout(indices: torch.Tensor) -> torch.Tensor:
    """Channel-first host ``(B, G, h, w)`` -> core ``(B, h, w, G)`` (image hosts; video and audio
    layouts: :func:`gq_plugin.adapters._layout.from_host_layout`)."""
    if not isinstance(indices, torch.Tensor) or indices.ndim != 4:
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be a (B, G, h, w) tensor, got {got}")
    return _layout.from_host_layout(indices)


def posterior_of(encoded):
    """The posterior in what a host's ``encode`` returns: diffusers' ``.latent_dist``, the first item
    of a tuple (``return_dict=False``), or the posterior itself (ldm)."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist
    if isinstance(encoded, tuple):
        return encoded[0]
    return encoded


class GQPosteriorMixin:
    """GQ/TDC behaviour for a diagonal-Gaussian posterior with ``mean``/``logvar`` on dim 1.

    Image ``(B, C, H, W)``, video ``(B, C, T, H, W)`` and audio ``(B, C, T)`` latents are searched
    in the quantizer's 4-D view (:mod:`._layout`); indices and rates come back channel-first in
    the latent's own layout.

    Host classes provide the plain-Gaussian fallbacks ``_gaussian_sample(generator)`` (used in
    training) and ``_gaussian_kl(other)`` (used for ``kl(other)`` against another posterior).
    """

    quantizer = None  # set by _gq_init

    def _gq_init(self, quantizer, kl_scale=None) -> None:
        self.quantizer = quantizer
        self._gq_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kl_cache: torch.Tensor | None = None
        self._kl_scale = kl_scale  # None or a callable returning the factor applied in kl()

    # ----------------------------------------------------------------- GQ quantities

    @property
    def gq_training(self) -> bool:
        return bool(self.quantizer.training)

    def quantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_hat, indices)`` of this posterior (cached; no gradient)."""
        if self._gq_cache is None:
            z_hat, idx = self.quantizer.quantize(_layout.fold(self.mean), _layout.fold(self.logvar))
            ndim, batch = self.mean.ndim, self.mean.shape[0]
            self._gq_cache = (_layout.unfold(z_hat, ndim, batch), _layout.to_host_layout(idx, ndim, batch))
        return self._gq_cache

    @property
    def z_hat(self) -> torch.Tensor:
        """The GQ codeword latent (same shape/dtype as ``mean``)."""
        return self.quantize()[0]

    @property
    def indices(self) -> torch.Tensor:
        """GQ indices in the host layout ``(B, n_codebooks, *latent axes)``, int64."""
        return self.quantize()[1]

    def rates(self) -> torch.Tensor:
        """Per-group rates in bits, host layout ``(B, n_codebooks, *latent axes)``."""
        rates = self.quantizer.rates(_layout.fold(self.mean), _layout.fold(self.logvar))
        return _layout.to_host_layout(rates, self.mean.ndim, self.mean.shape[0])

    def tdc_loss(self) -> torch.Tensor:
        """The TDC loss of this batch (a scalar) = ``kl().mean() / kl_scale()``."""
        return self._tdc().mean()

    def _tdc(self) -> torch.Tensor:
        """Per-sample TDC loss ``(B,)``; in training recorded once per posterior."""
        if not self.gq_training:
            return self._tdc_per_sample(record=False)
        if self._kl_cache is None:
            self._kl_cache = self._tdc_per_sample(record=True)
        return self._kl_cache

    def _tdc_per_sample(self, record: bool) -> torch.Tensor:
        rates = self.rates()
        tdc = self.quantizer.tdc
        # lam * sum(w * R) per sample, with the multipliers from before this step's update
        if record:
            return tdc(rates, reduction="none")  # also records statistics (and auto-steps)
        return tdc.per_sample_loss(rates)

    # ----------------------------------------------------------------- distribution API

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.gq_training:
            return self.z_hat
        return self._gaussian_sample(generator)

    def mode(self) -> torch.Tensor:
        if not self.gq_training:
            return self.z_hat
        return self.mean

    def kl(self, other=None) -> torch.Tensor:
        if other is not None:
            return self._gaussian_kl(other)
        tdc = self._tdc()
        return tdc if self._kl_scale is None else tdc * self._kl_scale()


class GQDiagonalGaussian(GQPosteriorMixin):
    """Posterior with the interface of ldm's / sgm's ``DiagonalGaussianDistribution``.

    Attributes ``parameters`` (the 2C moments), ``mean``, ``logvar`` (clamped to ``LOGVAR_RANGE`` = [-30, 20], as ldm),
    ``std``, ``var``, ``deterministic``; methods ``sample()``, ``mode()``, ``kl(other=None)``,
    ``nll(sample, dims=[1, 2, 3])``, plus the GQ extras (``indices``, ``z_hat``, ``rates()``).
    """

    def __init__(self, parameters: torch.Tensor, quantizer, deterministic: bool = False, kl_scale=None) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, *LOGVAR_RANGE)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        self._gq_init(quantizer, kl_scale)

    def _gaussian_sample(self, generator=None):
        return self.mean if self.deterministic else reparameterize(self.mean, self.logvar, generator)

    def _gaussian_kl(self, other):
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """Gaussian negative log-likelihood of ``sample`` (ldm's ``nll``), in nats."""
        if self.deterministic:
            return torch.zeros((), device=self.mean.device)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, dim=list(dims))
