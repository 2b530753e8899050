"""vector-quantize-pytorch adapter: :class:`GaussianQuantize`, a GQ drop-in for ``VectorQuantize``.

Code written for ``vector_quantize_pytorch.VectorQuantize`` (1.32.0) runs with ``GaussianQuantize``:

* **Constructor.** The whole ``VectorQuantize`` vocabulary is accepted. ``dim``,
  ``codebook_size``, ``codebook_dim``, ``heads``, ``layernorm_after_project_in``, ``channel_last``,
  ``accept_image_fmap``, ``accept_3d_fmap``, ``commitment_weight`` (scales the TDC loss) and
  ``return_zeros_for_masked_padding`` mean what they mean there; ``freeze_codebook`` is accepted
  (the Gaussian codebook is always frozen). The options that only make sense for a learned
  codebook (``decay``, ``kmeans_init``, ``threshold_ema_dead_code``, ``use_cosine_sim``,
  ``rotation_trick``, ``orthogonal_reg_weight``, ``separate_codebook_per_head=True``, ...) are
  accepted and ignored with **one** ``UserWarning`` that names them all. Unknown names raise
  ``TypeError`` as usual.
* **Projection.** As in ``VectorQuantize``: the codebook space has ``codebook_dim * heads``
  channels; when that differs from ``dim`` a learned ``project_in`` / ``project_out`` pair is added
  (``has_projections``). ``project_in`` maps the ``2 * dim`` posterior channels (mean || logvar)
  to ``2 * codebook_dim * heads`` (the new mean || logvar), ``project_out`` maps the
  quantized ``codebook_dim * heads`` channels back to ``dim``. Without projection (``heads *
  codebook_dim == dim``) the modules are ``nn.Identity``.
* **Input.** GQ needs a posterior, so ``x`` carries ``2 * dim`` channels, mean first then
  log-variance (diffusers' "moments"), on the channel axis of the layout; or pass ``q(mean,
  logvar)`` / ``q((mean, logvar))``. The output has ``dim`` channels like ``VectorQuantize``'s, so
  only the layer in front of the quantizer changes (it emits twice the channels).
* **Indices** are shaped like ``VectorQuantize``'s: ``(b, n)`` / ``(b, h, w)`` / ``(b, t, h, w)`` /
  ``(b,)``, with a trailing ``heads`` axis when ``heads > 1``; int64; ``-1`` at masked positions.
  They are returned in training too (``search_in_train=True`` by default here).
* **forward(x, mask=None, lens=None, freeze_codebook=None, return_loss_breakdown=False)`` as
  ``VectorQuantize``: ``mask`` (``(b, n)`` bool, True = keep) or ``lens`` (``(b,)``) mark padding;
  padded positions get index -1, quantized 0 (or the posterior mean with
  ``return_zeros_for_masked_padding=False``) and are left out of the TDC loss and of the TDC
  statistics. ``return_loss_breakdown=True`` adds a :class:`LossBreakdown` named tuple.
  ``indices=`` (cross-entropy against given codes) and ``topk`` are refused with a
  ``ValueError``; the EMA-related forward options are ignored with one warning.
* **Loss.** Training: the TDC loss **normalised per latent element** (``loss_reduction="element"``,
  the default): ``lam * mean over (unmasked) tokens and groups of w_g * R_g / m`` -- bits per
  latent channel, the scale of ``VectorQuantize``'s mean-squared commitment loss (about
  ``log2 K / m`` once the rates sit at the target; 0.72 against ``VectorQuantize``'s 1.0 on the
  README's first example with a unit-variance posterior) -- times ``commitment_weight``; eval: 0.
  It does not grow with the batch, the image size or the number of groups.
  ``loss_reduction="group"``: the mean over tokens and groups (bits per sub-codebook, ``m`` times
  larger); ``"sum"``: the paper's scale, summed over tokens and groups, mean over the batch
  (use it against a summed reconstruction loss).

It is a :class:`~gq_plugin.GaussianQuantizer` over the codebook space (``codebook_dim * heads``
channels): ``rates()``, ``tdc_step()``, ``codebook_usage()`` and the state-dict checks work.
"""

from __future__ import annotations

import warnings
from collections import namedtuple

import torch
from torch import nn

from ..quantizer import GaussianQuantizer, GQConfig, unpack_posterior
from ..rate import group_rates

# VectorQuantize (1.32.0 to 1.34.1) constructor options with no meaning for a fixed Gaussian codebook
# trained by TDC, with their VectorQuantize defaults (1.34 added the dead-code ratios).
IGNORED_OPTIONS = {
    "decay": 0.8, "eps": 1e-5, "kmeans_init": False, "kmeans_iters": 10, "sync_kmeans": True, "use_cosine_sim": False,
    "threshold_ema_dead_code": 0, "commitment_use_cross_entropy_loss": False, "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False, "orthogonal_reg_max_codes": None, "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0, "stochastic_sample_codes": False, "sample_codebook_temp": 1.0,
    "straight_through": False, "rotation_trick": None, "directional_reparam": False, "directional_reparam_variance": 5e-3,
    "sync_codebook": None, "sync_affine_param": False, "ema_update": None, "vq_bridge": None, "manual_ema_update": False,
    "learnable_codebook": None, "in_place_codebook_optimizer": None, "manual_in_place_optimizer_update": False,
    "affine_param": False, "affine_param_batch_decay": 0.99, "affine_param_codebook_decay": 0.9, "sync_update_v": 0.0,
    "route_gradients_to_input": True, "dead_code_threshold_ratio": 0.0, "reset_cluster_size_ratio": None,
    "reset_cluster_size": None,
}
# forward() options of VectorQuantize that only steer its EMA / sampling
LOSS_REDUCTIONS = ("element", "group", "sum")
IGNORED_FORWARD_OPTIONS = ("sample_codebook_temp", "codebook_transform_fn", "ema_update_weight", "accum_ema_update", "ema_update")

LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize", "tdc", "bits_mean", "bits_min", "bits_max"]
)
LossBreakdown.__doc__ = """``VectorQuantize``'s loss breakdown fields plus GQ's.

``commitment`` and ``tdc`` are the TDC loss (it takes the commitment loss's place; before
``commitment_weight``); ``codebook_diversity``, ``orthogonal_reg`` and ``inplace_optimize`` are 0
(a fixed codebook has none); ``bits_mean/min/max`` are the unmasked group rates of the batch."""


class GaussianQuantize(GaussianQuantizer):
    """Gaussian Quant + TDC with ``VectorQuantize``'s constructor, forward and return conventions.

    Args:
        dim: channels of the quantized output (the input carries ``2 * dim``: mean || logvar).
        codebook_size: K.
        codebook_dim: channels per (sub-)codebook m; default ``dim``.
        heads: sub-codebooks per token G; the codebook space has ``codebook_dim * heads``
            channels (projected from / to ``dim`` when they differ).
        commitment_weight: multiplies the TDC loss.
        loss_reduction: ``"element"`` (default), ``"group"`` or ``"sum"`` (see the module docstring).
        search_in_train: also return indices in training (default True, as ``VectorQuantize``).
        **options: the rest of ``VectorQuantize``'s vocabulary (see the module docstring) and
            :class:`~gq_plugin.GaussianQuantizer`'s keywords (``grouping``, ``seed``, ``beta``,
            ``tolerance``, ``lam_factor``, ``tdc_auto_step``, ...).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        freeze_codebook: bool = False,
        layernorm_after_project_in: bool = False,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        return_zeros_for_masked_padding: bool = True,
        search_in_train: bool = True,
        loss_reduction: str = "element",
        **options,
    ) -> None:
        for name, v in (("dim", dim), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive int, got {codebook_dim!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap are exclusive")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not commitment_weight >= 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight!r}")
        ignored = [k for k in options if k in IGNORED_OPTIONS]
        if separate_codebook_per_head:
            ignored.insert(0, "separate_codebook_per_head")
        gq_kwargs = {k: v for k, v in options.items() if k not in IGNORED_OPTIONS}
        unknown = sorted(set(gq_kwargs) - set(GQConfig.names()))
        if unknown:  # a typo is a TypeError, as for VectorQuantize itself
            raise TypeError(f"GaussianQuantize got unexpected keyword argument(s) {unknown}")
        if ignored:
            warnings.warn(
                "GaussianQuantize ignores these VectorQuantize options (a fixed Gaussian codebook trained by TDC has no "
                f"EMA, k-means, dead codes, per-head codebooks or codebook losses): {', '.join(ignored)}",
                UserWarning,
                stacklevel=2,
            )
        inner = codebook_dim * heads
        super().__init__(inner, codebook_size, codebook_dim, accept_image_fmap=accept_image_fmap,
                         channel_last=channel_last or accept_3d_fmap, search_in_train=search_in_train,
                         **gq_kwargs)
        self.input_dim = dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.freeze_codebook = freeze_codebook
        self.accept_3d_fmap = accept_3d_fmap
        self.commitment_weight = float(commitment_weight)
        self.loss_reduction = loss_reduction
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.has_projections = inner != dim
        if self.has_projections:
            layers = [nn.Linear(2 * dim, 2 * inner)]
            if layernorm_after_project_in:
                layers.append(nn.LayerNorm(2 * inner))
            self.project_in = nn.Sequential(*layers)
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self._warned_forward: set[str] = set()
        register_with_vector_quantize_pytorch()

    # ----------------------------------------------------------- layouts

    def _vq_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[..., 0] if self.heads == 1 else idx

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """VectorQuantize-layout indices -> channel-last ``(B, *spatial, G)`` int64 (validated)."""
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be a tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        g = self.num_codebooks
        idx = indices.unsqueeze(-1) if self.heads == 1 else indices
        if idx.shape[-1] != g:
            raise ValueError(f"indices must end with the heads axis ({g}), got {tuple(indices.shape)}")
        spatial = 2 if self.accept_image_fmap else 3 if self.accept_3d_fmap else None
        if spatial is not None and idx.ndim != spatial + 2:
            raise ValueError(f"indices must have {spatial} spatial axes after the batch axis, got {tuple(indices.shape)}")
        if spatial is None and idx.ndim not in (2, 3):
            raise ValueError(f"indices must be (b, n{', heads' if g > 1 else ''}) or (b{', heads' if g > 1 else ''}), got {tuple(indices.shape)}")
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}] (-1 marks masked padding)")
        return idx.long()

    def _moments(self, x, logvar):
        """-> (moments in the core layout after project_in, the input's mean before it, 3d spatial shape or None)."""
        x, logvar = unpack_posterior(x, logvar)
        if logvar is not None and (not isinstance(logvar, torch.Tensor) or logvar.shape != x.shape):
            raise ValueError(f"logvar must be a tensor shaped like mean {tuple(x.shape)}")
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        ch = 1 if (fmap or x.ndim == 2 or (x.ndim == 3 and not self.channel_last)) else x.ndim - 1
        x = x if logvar is None else torch.cat([x, logvar], dim=ch)
        want = 5 if self.accept_3d_fmap else 4 if self.accept_image_fmap else None
        if want is not None and x.ndim != want:
            raise ValueError(f"x must have {want} dims (b, c, {'t, ' if want == 5 else ''}h, w), got {tuple(x.shape)}")
        if want is None and x.ndim not in (2, 3):
            raise ValueError(f"x must be (b, n, c), (b, c, n) with channel_last=False, or (b, c); got {tuple(x.shape)}")
        if x.shape[ch] != 2 * self.input_dim:
            raise ValueError(
                f"x must carry mean and logvar: 2*dim={2 * self.input_dim} channels on axis {ch}, got {x.shape[ch]} "
                f"(shape {tuple(x.shape)})"
            )
        raw_mean = x.chunk(2, dim=ch)[0]
        shape3d = None
        if self.accept_3d_fmap:
            shape3d = tuple(x.shape[2:])
            x, ch = x.flatten(2).transpose(1, 2), 2  # (b, t*h*w, 2c)
        if self.has_projections:
            x = self.project_in(x.movedim(ch, -1)).movedim(-1, ch)
        return x, raw_mean, shape3d

    def _output(self, z: torch.Tensor, shape3d) -> torch.Tensor:
        """Core-layout quantized latent -> project_out -> VectorQuantize's output layout."""
        axis = 1 if (self.accept_image_fmap or (z.ndim == 3 and not self.channel_last and not self.accept_3d_fmap)) else -1
        if self.has_projections:
            z = self.project_out(z.movedim(axis, -1)).movedim(-1, axis)
        if shape3d is not None:
            z = z.transpose(1, 2).reshape(z.shape[0], -1, *shape3d)
        return z

    def _seq_mask(self, mask, lens, mean: torch.Tensor) -> torch.Tensor | None:
        if mask is None and lens is None:
            return None
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if self.accept_image_fmap or self.accept_3d_fmap or mean.ndim != 3:
            raise ValueError("mask / lens apply to sequences (b, n, d) only, as in VectorQuantize")
        b, n = mean.shape[0], mean.shape[1] if self.channel_last else mean.shape[2]
        if lens is not None:
            lens = torch.as_tensor(lens, device=mean.device)
            if lens.shape != (b,):
                raise ValueError(f"lens must be ({b},), got {tuple(lens.shape)}")
            return torch.arange(n, device=mean.device) < lens[:, None]
        if not isinstance(mask, torch.Tensor) or mask.shape != (b, n):
            raise ValueError(f"mask must be a ({b}, {n}) bool tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
        return mask.to(device=mean.device, dtype=torch.bool)

    # ----------------------------------------------------------- public API

    def forward(self, x, logvar: torch.Tensor | None = None, *, indices=None, mask=None, lens=None, topk=None,
                freeze_codebook=None, return_loss_breakdown: bool = False, generator: torch.Generator | None = None, **options):
        """``(quantized, indices, loss)`` (+ :class:`LossBreakdown` with ``return_loss_breakdown``)."""
        if indices is not None:
            raise ValueError("GaussianQuantize does not support forward(indices=...) (a cross-entropy against given codes)")
        if topk is not None:
            raise ValueError("GaussianQuantize does not support topk (GQ picks one codeword per group)")
        unknown = [k for k in options if k not in IGNORED_FORWARD_OPTIONS]
        if unknown:
            raise TypeError(f"GaussianQuantize.forward() got unexpected keyword arguments {unknown}")
        fresh = [k for k in options if k not in self._warned_forward and not (options[k] is None or options[k] is False)]
        if fresh:
            self._warned_forward.update(fresh)
            warnings.warn(f"GaussianQuantize.forward ignores the VectorQuantize options {', '.join(fresh)} (no EMA / sampling)",
                          UserWarning, stacklevel=2)
        moments, raw_mean, shape3d = self._moments(x, logvar)
        mean, lv, axis = self._split(moments, None)
        keep = self._seq_mask(mask, lens, mean)
        zero = torch.zeros((), device=mean.device)
        stats = {}
        if not self.training:
            quantized, idx = self._quantize(mean, lv, axis)
            loss = zero
        else:
            mean32 = mean.float()
            lv32 = lv.float().clamp(*self.logvar_range)
            noise = torch.randn(mean32.shape, generator=generator, device=mean32.device, dtype=mean32.dtype)
            quantized = (mean32 + torch.exp(0.5 * lv32) * noise).to(mean.dtype)
            rates = group_rates(mean32.movedim(axis, -1), lv32.movedim(axis, -1), self.codebook_dim, self.grouping)
            valid = rates[keep] if keep is not None else rates
            loss = self.tdc(valid.reshape(-1)) if valid.numel() else zero  # mean over tokens and groups
            if self.loss_reduction == "element":
                loss = loss / self.codebook_dim
            elif self.loss_reduction == "sum":
                loss = loss * (valid.numel() / mean.shape[0])
            stats = self.tdc.last_stats if valid.numel() else {}
            idx = self._quantize(mean.detach(), lv.detach(), axis)[1] if self.search_in_train else None
        tdc_loss = loss
        loss = loss * self.commitment_weight
        out = self._output(quantized, shape3d)
        if idx is not None and shape3d is not None:
            idx = idx.reshape(idx.shape[0], *shape3d, idx.shape[-1])
        if keep is not None:
            if idx is not None:
                idx = idx.masked_fill(~keep[..., None], -1)
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else raw_mean.to(out.dtype)
            k = keep[..., None] if self.channel_last else keep[:, None, :]
            out = torch.where(k, out, fill)
        result = (out, None if idx is None else self._vq_indices(idx), loss)
        if not return_loss_breakdown:
            return result
        breakdown = LossBreakdown(tdc_loss, zero, zero, zero, tdc_loss, stats.get("bits-mean", zero),
                                  stats.get("bits-min", zero), stats.get("bits-max", zero))
        return (*result, breakdown)

    def rates(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Group rates in bits, shaped like the indices (with the heads axis)."""
        moments, _, shape3d = self._moments(x, logvar)
        mean, lv, axis = self._split(moments, None)
        r = group_rates(mean.float().movedim(axis, -1), lv.float().clamp(*self.logvar_range).movedim(axis, -1), self.codebook_dim, self.grouping)
        return r.reshape(r.shape[0], *shape3d, r.shape[-1]) if shape3d is not None else r

    @torch.no_grad()
    def quantize(self, x, logvar: torch.Tensor | None = None):
        """GQ in any mode: ``(quantized, indices)`` (quantized after ``project_out``)."""
        moments, _, shape3d = self._moments(x, logvar)
        mean, lv, axis = self._split(moments, None)
        z_hat, idx = self._quantize(mean, lv, axis)
        if shape3d is not None:
            idx = idx.reshape(idx.shape[0], *shape3d, idx.shape[-1])
        return self._output(z_hat, shape3d), self._vq_indices(idx)

    @torch.no_grad()
    def encode_indices(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        return self.quantize(x, logvar)[1]

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook-space codes (before ``project_out``), channel-first for feature maps (as VectorQuantize)."""
        z = GaussianQuantizer.dequant(self, indices)
        return z.movedim(-1, 1) if self.accept_3d_fmap else z

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> the quantized output ``forward`` returns in eval (after ``project_out``)."""
        codes = self.get_codes_from_indices(indices)
        if not self.has_projections:
            return codes
        axis = 1 if (self.accept_image_fmap or self.accept_3d_fmap or (codes.ndim == 3 and not self.channel_last)) else -1
        return self.project_out(codes.movedim(axis, -1)).movedim(-1, axis)

    dequant = get_output_from_indices
    indices_to_codes = get_output_from_indices


def register_with_vector_quantize_pytorch() -> bool:
    """Add :class:`GaussianQuantize` to ``vector_quantize_pytorch.utils.QUANTIZE_KLASSES`` so the
    package's ``Sequential`` recognises it as the quantizer. Returns True if registered (False
    when vector-quantize-pytorch is not installed). Runs on import of this module and on every
    construction, so the import order of the two packages does not matter."""
    try:
        from vector_quantize_pytorch import utils
    except ImportError:
        return False
    klasses = getattr(utils, "QUANTIZE_KLASSES", None)
    if klasses is None:
        return False
    if GaussianQuantize not in klasses:
        utils.QUANTIZE_KLASSES = tuple(klasses) + (GaussianQuantize,)
    return True


register_with_vector_quantize_pytorch()  # as soon as this adapter is imported (import order does not matter)
