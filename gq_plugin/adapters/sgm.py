"""Stability ``generative-models`` (``sgm``) adapter: a GQ regularizer for ``AutoencodingEngine``.

Written and tested against sgm's published interface as of upstream commit
``0ad7de9a5cb53fd63d6d30a4f385485e72e08597`` (sgm is not on PyPI). Two ways in:

* name the regularizer in a config (the loss's ``regularization_weights`` entry for ``kl_loss``
  is then the TDC weight you chose)::

    regularizer_config:
      target: gq_plugin.adapters.sgm.GaussianQuantRegularizer
      params: {dim: 16, codebook_size: 65536, codebook_dim: 16}
    loss_config:
      params: {regularization_weights: {kl_loss: 0.1}}

* or patch a built engine, e.g. an ``AutoencoderKL`` whose ``DiagonalGaussianRegularizer`` it
  replaces: :func:`patch_sgm_autoencoder` (``engine, K, m, tdc_weight``). The regularizer then
  reads the host's weight ``engine.loss.regularization_weights["kl_loss"]`` on every forward and
  divides by it, so the autoencoder loss holds ``tdc_weight * TDC`` whatever that weight is.

The encoder must emit ``2 * dim`` channels (mean || logvar, ``double_z: true``). The class
subclasses sgm's ``AbstractRegularizer`` when ``sgm`` imports, a plain ``nn.Module`` otherwise.
The TDC multipliers move once per autoencoder optimizer step inside sgm's manual-optimisation
``training_step`` (:mod:`._stepping`); its discriminator steps never move them.

**Indices for** ``AEIntegerWrapper`` (which flattens ``min_encoding_indices`` to ``(B, S)`` and
decodes ``S = h * w`` tokens): ``index_layout="position"`` gives one int64 per latent position,
``(B, H, W)``; with ``G = dim / codebook_dim > 1`` sub-codebooks that is the mixed-radix number
``sum_g i_g * K**(G-1-g)`` (needs ``K**G < 2**63``). ``"grouped"`` gives ``(B, H, W, G)`` (G
tokens of K values per position, for token models); decode it with
``AEIntegerWrapper(model, shape=(h, w * G))``. ``"auto"`` (default): position when it fits int64.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ..codebook import ungroup_channels
from ..quantizer import GaussianQuantizer
from . import _patch, _stepping

try:  # pragma: no cover - sgm is not pip-installable; exercised only where it is on the path
    from sgm.modules.autoencoding.regularizers.base import AbstractRegularizer as _Base

    HAS_SGM = True
except Exception:  # ImportError, or sgm's heavy package __init__ failing
    _Base = nn.Module
    HAS_SGM = False

SGM_COMMIT = "0ad7de9a5cb53fd63d6d30a4f385485e72e08597"
INDEX_LAYOUTS = ("auto", "position", "grouped")
_INT64_MAX = 2**63 - 1


class GaussianQuantRegularizer(_Base):
    """``forward(z[B, 2*dim, H, W]) -> (z, log)``.

    Training: ``z`` is the reparameterised sample; ``log`` has ``"kl_loss"`` (the TDC loss averaged
    over the batch like ``DiagonalGaussianRegularizer``'s, times ``tdc_weight / host weight``),
    ``"tdc_loss"`` (unscaled, detached), ``"bits-mean"``, ``"bits-min"``, ``"bits-max"`` and the
    multipliers ``"lam"``, ``"lam-max"``, ``"lam-min"``.
    Eval: ``z`` is the GQ latent; ``log`` has ``"min_encoding_indices"`` (see ``index_layout``),
    ``"kl_loss"`` = 0, the rate statistics, ``"perplexity"`` and ``"zhat_noquant"`` (the mean).

    Args:
        dim: latent channels; codebook_size: K; codebook_dim: m (default ``dim``).
        index_layout: ``"auto"`` | ``"position"`` | ``"grouped"`` (module docstring).
        tdc_weight: the weight TDC should have in the host loss.
        host_weight: the weight the host loss multiplies ``log[loss_key]`` by (default 1, or read
            from the engine's loss after :func:`patch_sgm_autoencoder`).
        loss_key: the log key carrying the loss (``"kl_loss"``, what sgm's KL configs weight).
        **gq_kwargs: :class:`~gq_plugin.GaussianQuantizer` keywords (``grouping="strided"`` reads
            the reference repository's checkpoints).
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, log_perplexity: bool = True,
                 index_layout: str = "auto", tdc_weight: float = 1.0, host_weight: float | None = None,
                 loss_key: str = "kl_loss", **gq_kwargs) -> None:
        super().__init__()
        self.gq = GaussianQuantizer(dim, codebook_size, codebook_dim, accept_image_fmap=True, **gq_kwargs)
        _stepping.configure(self.gq, gq_kwargs)
        self.log_perplexity = log_perplexity
        self.tdc_weight = _patch.check_weight("tdc_weight", tdc_weight)
        self.host_weight = None if host_weight is None else _patch.check_weight("host_weight", host_weight)
        self.loss_key = loss_key
        g, k = self.gq.num_codebooks, self.gq.codebook_size
        fits = g == 1 or k**g <= _INT64_MAX
        if index_layout not in INDEX_LAYOUTS:
            raise ValueError(f"index_layout must be one of {INDEX_LAYOUTS}, got {index_layout!r}")
        if index_layout == "position" and not fits:
            raise ValueError(
                f"index_layout='position' packs G={g} indices of codebook_size={k} into one int64, but K**G = 2**"
                f"{g * math.log2(k):g} does not fit: use index_layout='grouped' or a larger codebook_dim"
            )
        self.index_layout = ("position" if fits else "grouped") if index_layout == "auto" else index_layout

    @property
    def num_codebooks(self) -> int:
        return self.gq.num_codebooks

    def get_trainable_parameters(self) -> Any:
        yield from ()

    # ------------------------------------------------------------------ weights

    def loss_scale(self) -> float:
        """``tdc_weight / host weight``: the factor on the TDC loss in ``log[loss_key]``."""
        bound = self.__dict__.get("_host_weight_of")
        host = bound() if bound is not None else (1.0 if self.host_weight is None else self.host_weight)
        return self.tdc_weight / host

    # ------------------------------------------------------------------ index layout

    def _to_sgm_indices(self, idx: torch.Tensor) -> torch.Tensor:  # core (B, H, W, G) -> sgm layout
        g = self.gq.num_codebooks
        if g == 1:
            return idx[..., 0]
        if self.index_layout == "grouped":
            return idx
        k = self.gq.codebook_size
        packed = idx[..., 0].clone()
        for i in range(1, g):
            packed = packed * k + idx[..., i]
        return packed

    def _from_sgm_indices(self, indices: torch.Tensor) -> torch.Tensor:  # sgm layout -> core (B, H, W, G)
        if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
            raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
        g, k = self.gq.num_codebooks, self.gq.codebook_size
        if g == 1 or self.index_layout == "position":
            if g == 1 and indices.ndim == 4 and indices.shape[-1] == 1:
                indices = indices[..., 0]
            if indices.ndim != 3:
                raise ValueError(f"indices must be (B, H, W) (index_layout={self.index_layout!r}), got {tuple(indices.shape)}")
            if g == 1:
                return indices.unsqueeze(-1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k**g):
                raise ValueError(f"packed indices must lie in [0, {k}**{g}), got [{int(indices.min())}, {int(indices.max())}]")
            parts, rest = [], indices.long()
            for _ in range(g):
                parts.append(rest % k)
                rest = torch.div(rest, k, rounding_mode="floor")
            return torch.stack(parts[::-1], dim=-1)
        if indices.ndim == 3 and indices.shape[-1] % g == 0:  # AEIntegerWrapper(shape=(h, w * G))
            indices = indices.reshape(*indices.shape[:2], indices.shape[2] // g, g)
        if indices.ndim != 4 or indices.shape[-1] != g:
            raise ValueError(f"indices must be (B, H, W, {g}) or (B, H, W * {g}) (index_layout='grouped'), got {tuple(indices.shape)}")
        return indices

    # ------------------------------------------------------------------ forward / decode

    def _rate_log(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.gq.rates(z).detach()
        return {"bits-mean": r.mean(), "bits-min": r.min(), "bits-max": r.max()}

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out, idx, loss = self.gq(z)
        log: dict[str, torch.Tensor] = {}
        if self.training:
            log[self.loss_key] = loss * self.loss_scale()
            log["tdc_loss"] = loss.detach()
            log.update({k: v for k, v in self.gq.tdc.last_stats.items() if not k.endswith("-global")})
            tdc = self.gq.tdc
            log.update({"lam": tdc.lam_global.clone(), "lam-max": tdc.lam_max.clone(), "lam-min": tdc.lam_min.clone()})
        else:
            log[self.loss_key] = loss
            log.update(self._rate_log(z))
            log["zhat_noquant"] = z.chunk(2, dim=1)[0]
            if self.log_perplexity:
                log["perplexity"] = torch.tensor(self.gq.codebook_usage(idx).perplexity)
        if idx is not None:
            log["min_encoding_indices"] = self._to_sgm_indices(idx)
        return out, log

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes for sgm-layout indices.

        Without ``shape`` (what ``AEIntegerWrapper.decode`` calls): ``(B, H, W)`` (position layout)
        or ``(B, H, W, G)`` / ``(B, H, W * G)`` (grouped) -> channel-last ``(B, H, W, dim)``.
        With ``shape = (B, H, W, C)`` (taming/sgm quantizer convention): the same indices in any
        shape holding their ``B*H*W`` (position) or ``B*H*W*G`` (grouped) entries -> ``(B, C, H, W)``.
        """
        if shape is not None:
            b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
            lead = (b, h, w) if self.gq.num_codebooks == 1 or self.index_layout == "position" else (b, h, w, self.gq.num_codebooks)
            return self.gq.dequant(self._from_sgm_indices(indices.reshape(lead)))
        codes = self.gq.get_codes_from_indices(self._from_sgm_indices(indices))  # (B, H, W, G, m)
        return ungroup_channels(codes, self.gq.grouping)

    def dequant(self, indices: torch.Tensor) -> torch.Tensor:
        """sgm-layout indices -> ``(B, dim, H, W)``."""
        return self.gq.dequant(self._from_sgm_indices(indices))

    def tdc_step(self) -> bool:
        """Update the TDC multipliers by hand (only with ``tdc_auto_step=False``)."""
        return self.gq.tdc_step()


def _regularization_weight(loss: nn.Module, key: str) -> float:
    weights = getattr(loss, "regularization_weights", None) or {}
    if key not in weights:
        raise ValueError(
            f"the engine's loss.regularization_weights has no {key!r} entry (has {sorted(weights)}): the TDC loss would "
            f"not reach the autoencoder loss; add {key}: 1.0"
        )
    return _patch.check_weight(f"loss.regularization_weights[{key!r}]", weights[key])


def _latent_dim(engine) -> int:
    for conv in (getattr(engine, "quant_conv", None), getattr(getattr(engine, "encoder", None), "conv_out", None)):
        out = getattr(conv, "out_channels", None)
        if isinstance(out, int):
            if out % 2:
                raise ValueError(f"the encoder head must emit 2*dim channels (mean || logvar, double_z), got {out}")
            return out // 2
    raise ValueError("cannot infer the latent dim (no quant_conv / encoder.conv_out): pass dim=")


def patch_sgm_autoencoder(engine, K: int = 2**16, m: int | None = None, *, dim: int | None = None,
                          tdc_weight: float = 1.0, **regularizer_kwargs):
    """Replace ``engine.regularization`` (an sgm ``AutoencodingEngine``'s) by a
    :class:`GaussianQuantRegularizer` bound to ``engine.loss``'s regularization weight.

    ``dim`` defaults to ``quant_conv.out_channels / 2`` (``AutoencodingEngineLegacy``) or the
    encoder's ``conv_out.out_channels / 2``. Undo with :func:`gq_plugin.adapters.unpatch`.
    """
    for a in ("encoder", "decoder", "regularization", "loss"):
        if not hasattr(engine, a):
            raise ValueError(f"not an sgm AutoencodingEngine: missing {a!r}")
    dim = _latent_dim(engine) if dim is None else dim
    m = dim if m is None else m
    _patch.check_codebook_dim(dim, m)
    reg = GaussianQuantRegularizer(dim, K, m, tdc_weight=tdc_weight, **regularizer_kwargs)
    if reg.host_weight is None:
        _regularization_weight(engine.loss, reg.loss_key)  # fail now, not at the first training step
        reg.__dict__["_host_weight_of"] = functools.partial(_regularization_weight, engine.loss, reg.loss_key)
    ref = next(iter(engine.encoder.parameters()), None)
    if ref is not None:
        reg.to(ref.device)
    _patch.install(engine, "sgm", attrs={"regularization": reg}, quantizer="regularization")
    return engine


def unpatch_sgm_autoencoder(engine):
    """Undo :func:`patch_sgm_autoencoder`; returns the removed regularizer."""
    return _patch.uninstall(engine, "sgm")
