"""taming-transformers adapter: a GQ drop-in for ``VectorQuantizer2`` and ``VQModel``.

:class:`GaussianVectorQuantizer` has ``VectorQuantizer2``'s call contract,
``forward(z) -> (z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` and
``get_codebook_entry(indices, shape=(B, H, W, C)) -> (B, C, H, W)``, but ``z`` carries
``2 * e_dim`` channels (mean || logvar): GQ needs a Gaussian posterior.

Training: ``z_q`` is the reparameterised sample, ``loss`` the TDC loss **normalised per latent
element** (``loss_reduction="element"``: ``lam * mean over batch, positions and groups of
w_g * R_g / m``, bits per latent channel -- about ``log2 K / m`` at the target), so
``VQModel``'s ``codebook_weight * loss`` (default weight 1) sits next to its mean reconstruction
loss without retuning (``"group"``: bits per sub-codebook; ``"sum"``: the paper's summed scale);
indices ``None`` (unless ``search_in_train=True``). Eval: ``z_q`` the GQ
latent, ``loss`` 0, ``perplexity`` the codebook perplexity of the batch, ``min_encodings`` ``None``
(a one-hot ``N x K`` matrix is not materialised), indices flat ``(B*H*W*G,)`` ordered
``(b, h, w, g)`` -- or ``(B, H, W)`` / ``(B, H, W, G)`` with ``sane_index_shape=True``.

taming's encoder emits ``z_channels`` and ``quant_conv`` maps them to ``embed_dim``; a Gaussian
head needs ``2 * embed_dim``. :func:`patch_taming_vqmodel` therefore **widens** ``quant_conv`` to
``2 * embed_dim`` outputs: the mean half is a copy of the old conv (so the pretrained VQ-GAN's
latents are the initial posterior means) and the log-variance half starts at weight 0, bias
``logvar_init`` (default -6, i.e. sigma ~ 0.05, a nearly deterministic start that TDC then
relaxes). ``quantize`` is replaced by a :class:`GaussianVectorQuantizer`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codebook import ungroup_channels
from ..quantizer import GaussianQuantizer
from . import _patch, _stepping


class GaussianVectorQuantizer(nn.Module):
    """GQ with taming ``VectorQuantizer2``'s interface.

    Args:
        n_e: codebook size K.
        e_dim: latent channels C (the posterior mean's channels; the input has 2C).
        beta, legacy: accepted for signature compatibility, unused (TDC replaces the
            commitment loss).
        remap: not supported (GQ indices already index the full fixed codebook).
        sane_index_shape: return indices ``(B, H, W[, G])`` instead of flat.
        loss_reduction: ``"element"`` (default), ``"group"`` or ``"sum"`` (module docstring).
        codebook_dim: m channels per sub-codebook (default ``e_dim``).
        **gq_kwargs: :class:`~gq_plugin.GaussianQuantizer` keywords. Without ``tdc_auto_step`` the
            TDC multipliers move once per autoencoder optimizer step, also inside ``VQModel``'s own
            Lightning ``training_step`` whose discriminator pass runs this quantizer too
            (:mod:`gq_plugin.adapters._stepping`).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap=None, unknown_index="random",
                 sane_index_shape: bool = False, legacy: bool = True, codebook_dim: int | None = None,
                 loss_reduction: str = "element", **gq_kwargs) -> None:
        super().__init__()
        if loss_reduction not in ("element", "group", "sum"):
            raise ValueError(f"loss_reduction must be 'element', 'group' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        if remap is not None:
            raise ValueError("GaussianVectorQuantizer does not support remap: GQ indices index the full fixed codebook")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.remap = None
        self.sane_index_shape = sane_index_shape
        self.gq = GaussianQuantizer(e_dim, n_e, codebook_dim, accept_image_fmap=True, **gq_kwargs)
        _stepping.configure(self.gq, gq_kwargs)

    @property
    def re_embed(self) -> int:
        return self.n_e

    @property
    def codebook(self) -> torch.Tensor:
        return self.gq.codebook

    def _index_layout(self, idx: torch.Tensor) -> torch.Tensor:  # core (B, H, W, G) -> taming
        if self.sane_index_shape:
            return idx[..., 0] if self.gq.num_codebooks == 1 else idx
        return idx.reshape(-1)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp / rescale_logits / return_logits exist only for interface compatibility with GumbelQuantize")
        z_q, idx, loss = self.gq(z)
        # the core loss is lam * mean over batch of sum over (positions, groups)
        if self.loss_reduction != "sum":
            per = self.gq.dim if self.loss_reduction == "element" else self.gq.num_codebooks
            loss = loss / (z.shape[-2] * z.shape[-1] * per)
        perplexity = None
        if idx is not None:
            if not self.training:
                perplexity = torch.tensor(self.gq.codebook_usage(idx).perplexity, device=z.device)
            idx = self._index_layout(idx)
        return z_q, loss, (perplexity, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """``shape = (B, H, W, C)``: indices (any layout, ``B*H*W*G`` entries) -> ``(B, C, H, W)``.
        ``shape=None``: indices ``(..., G)`` or (for G = 1) ``(...)`` -> codes ``(..., C)``."""
        g = self.gq.num_codebooks
        if shape is not None:
            b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
            return self.gq.dequant(indices.reshape(b, h, w, g))
        lead = indices.shape if g == 1 else indices.shape[:-1]
        codes = self.gq.get_codes_from_indices(indices.reshape(1, 1, -1, g))  # (1, 1, N, G, m)
        return ungroup_channels(codes, self.gq.grouping).reshape(*lead, self.e_dim)

    def embed_code(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """For ``VQModel.decode_code``: ``(B, H, W[, G])`` indices -> ``(B, C, H, W)``."""
        if shape is None:
            if indices.ndim < 3:
                raise ValueError("embed_code needs (B, H, W[, G]) indices or an explicit shape")
            b, h, w = indices.shape[:3]
            shape = (b, h, w, self.e_dim)
        return self.get_codebook_entry(indices, shape)

    def tdc_step(self) -> bool:
        return self.gq.tdc_step()


def _widen_quant_conv(conv: nn.Conv2d, logvar_init: float) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"quant_conv must be an nn.Conv2d, got {type(conv).__name__}")
    c = conv.out_channels
    new = nn.Conv2d(conv.in_channels, 2 * c, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    bias=True, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:c].copy_(conv.weight)
        new.bias.fill_(logvar_init)
        new.bias[:c].copy_(conv.bias if conv.bias is not None else torch.zeros_like(new.bias[:c]))
    return new


def patch_taming_vqmodel(model, K: int | None = None, m: int | None = None, logvar_init: float = -6.0, **gq_kwargs):
    """Turn a taming ``VQModel`` (or any model with ``quant_conv``, ``quantize``, ``encode``) into a
    GQ VQ-VAE in place: widen ``quant_conv`` to ``2 * embed_dim`` and swap ``quantize``.

    ``K`` defaults to the old quantizer's ``n_e``; ``m`` to ``embed_dim``. ``encode`` /
    ``decode`` / ``forward`` / the VQ-GAN loss stay unchanged. The old modules are kept in the
    patch's undo record (not registered submodules); :func:`gq_plugin.adapters.unpatch` restores them.
    """
    for a in ("quant_conv", "quantize"):
        if not hasattr(model, a):
            raise ValueError(f"not a taming VQModel-like model: missing {a!r}")
    if isinstance(model.quantize, GaussianVectorQuantizer) or _patch.is_patched(model):
        raise ValueError("model is already patched with GaussianVectorQuantizer; call gq_plugin.adapters.unpatch(model) first")
    old_q = model.quantize
    embed_dim = model.quant_conv.out_channels
    K = K if K is not None else getattr(old_q, "n_e", None)
    if K is None:
        raise ValueError("pass K: the old quantizer has no n_e")
    old_conv = model.quant_conv
    new_conv = _widen_quant_conv(old_conv, logvar_init)
    sane = bool(getattr(old_q, "sane_index_shape", False))
    gq = GaussianVectorQuantizer(K, embed_dim, sane_index_shape=sane, codebook_dim=m, **gq_kwargs).to(new_conv.weight.device)
    gq.train(bool(getattr(model, "training", True)))
    _patch.install(model, "taming", attrs={"quant_conv": new_conv, "quantize": gq}, quantizer="quantize")
    return model


def unpatch_taming_vqmodel(model, keep_trained_mean: bool = True):
    """Undo :func:`patch_taming_vqmodel`; returns the removed :class:`GaussianVectorQuantizer`.

    With ``keep_trained_mean`` the mean half of the widened ``quant_conv`` (trained since the
    patch) is copied back into the restored conv; the old quantizer comes back as it was.
    """
    rec = _patch.record(model)
    if rec is None or rec["host"] != "taming":
        raise ValueError("model was not patched by patch_taming_vqmodel")
    if keep_trained_mean:
        old_conv = rec["attrs"]["quant_conv"]
        c = old_conv.out_channels
        with torch.no_grad():
            old_conv.weight.copy_(model.quant_conv.weight[:c])
            if old_conv.bias is not None:
                old_conv.bias.copy_(model.quant_conv.bias[:c])
    return _patch.uninstall(model, "taming")
