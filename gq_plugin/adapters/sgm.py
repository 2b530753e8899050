"""Stability ``generative-models`` (``sgm``) adapter: a GQ regularizer for ``AutoencodingEngine``.

Use it where sgm configs name a regularizer::

    regularizer_config:
      target: gq_plugin.adapters.sgm.GaussianQuantRegularizer
      params: {dim: 16, codebook_size: 65536, codebook_dim: 16}
    loss_config:
      params: {regularization_weights: {kl_loss: 0.1}}

The encoder must emit ``2 * dim`` channels (mean || logvar, ``double_z: true``), exactly what
``DiagonalGaussianRegularizer`` consumes. The class subclasses sgm's ``AbstractRegularizer`` when
``sgm`` is importable and is a plain ``nn.Module`` otherwise (same interface).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codebook import ungroup_channels
from ..quantizer import GaussianQuantizer

try:  # pragma: no cover - sgm is not pip-installable; exercised only where it is on the path
    from sgm.modules.autoencoding.regularizers.base import AbstractRegularizer as _Base

    HAS_SGM = True
except Exception:  # ImportError, or sgm's heavy package __init__ failing
    _Base = nn.Module
    HAS_SGM = False


class GaussianQuantRegularizer(_Base):
    """``forward(z[B, 2*dim, H, W]) -> (z, log)``.

    Training: ``z`` is the reparameterised sample; ``log`` has ``"kl_loss"`` (the TDC loss, already
    averaged over the batch like ``DiagonalGaussianRegularizer``'s), ``"bits-mean"``,
    ``"bits-min"``, ``"bits-max"`` (group rates of this batch) and the multipliers ``"lam"``,
    ``"lam-max"``, ``"lam-min"``.
    Eval: ``z`` is the GQ latent; ``log`` has ``"min_encoding_indices"`` (``(B, H, W)`` for one
    codebook per position, ``(B, H, W, G)`` for ``G = dim / codebook_dim`` > 1 -- the layout
    ``AEIntegerWrapper`` flattens), ``"kl_loss"`` = 0, the rate statistics, ``"perplexity"`` and
    ``"zhat_noquant"`` (the posterior mean).

    Args: ``dim`` (latent channels), ``codebook_size`` (K), ``codebook_dim`` (m), any
    :class:`~gq_plugin.GaussianQuantizer` keyword (``grouping="strided"`` reads the reference
    repository's checkpoints).
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, log_perplexity: bool = True, **gq_kwargs) -> None:
        super().__init__()
        self.gq = GaussianQuantizer(dim, codebook_size, codebook_dim, accept_image_fmap=True, **gq_kwargs)
        self.log_perplexity = log_perplexity

    @property
    def num_codebooks(self) -> int:
        return self.gq.num_codebooks

    def get_trainable_parameters(self) -> Any:
        yield from ()

    def _rate_log(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.gq.rates(z).detach()
        return {"bits-mean": r.mean(), "bits-min": r.min(), "bits-max": r.max()}

    def _to_sgm_indices(self, idx: torch.Tensor) -> torch.Tensor:  # core (B, H, W, G) -> sgm layout
        return idx[..., 0] if self.gq.num_codebooks == 1 else idx

    def _from_sgm_indices(self, indices: torch.Tensor) -> torch.Tensor:  # sgm layout -> core (B, H, W, G)
        if self.gq.num_codebooks == 1:
            if indices.ndim == 4 and indices.shape[-1] == 1:
                indices = indices[..., 0]
            if indices.ndim != 3:
                raise ValueError(f"indices must be (B, H, W), got {tuple(indices.shape)}")
            return indices.unsqueeze(-1)
        if indices.ndim != 4 or indices.shape[-1] != self.gq.num_codebooks:
            raise ValueError(f"indices must be (B, H, W, {self.gq.num_codebooks}), got {tuple(indices.shape)}")
        return indices

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out, idx, loss = self.gq(z)
        log: dict[str, torch.Tensor] = {"kl_loss": loss}
        if self.training:
            log.update({k: v for k, v in self.gq.tdc.last_stats.items() if not k.endswith("-global")})
            tdc = self.gq.tdc
            log.update({"lam": tdc.lam_global.clone(), "lam-max": tdc.lam_max.clone(), "lam-min": tdc.lam_min.clone()})
        else:
            log.update(self._rate_log(z))
            log["min_encoding_indices"] = self._to_sgm_indices(idx)
            log["zhat_noquant"] = z.chunk(2, dim=1)[0]
            if self.log_perplexity:
                log["perplexity"] = torch.tensor(self.gq.codebook_usage(idx).perplexity)
        if idx is not None and self.training:
            log["min_encoding_indices"] = self._to_sgm_indices(idx)
        return out, log

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes for sgm-layout indices.

        Without ``shape`` (what ``AEIntegerWrapper.decode`` calls): ``(B, H, W[, G])`` ->
        channel-last ``(B, H, W, dim)``. With ``shape = (B, H, W, C)`` (taming/sgm quantizer
        convention): indices of any layout holding ``B*H*W*G`` entries -> ``(B, C, H, W)``.
        """
        if shape is not None:
            b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
            g = self.gq.num_codebooks
            return self.gq.dequant(indices.reshape(b, h, w, g))
        codes = self.gq.get_codes_from_indices(self._from_sgm_indices(indices))  # (B, H, W, G, m)
        return ungroup_channels(codes, self.gq.grouping)

    def dequant(self, indices: torch.Tensor) -> torch.Tensor:
        """sgm-layout indices -> ``(B, dim, H, W)``."""
        return self.gq.dequant(self._from_sgm_indices(indices))

    def tdc_step(self) -> bool:
        """Update the TDC multipliers (call after each autoencoder optimizer step when
        ``tdc_auto_step=False``)."""
        return self.gq.tdc_step()
