"""``GaussianQuantizer``: a Gaussian-VAE bottleneck that becomes a VQ bottleneck in eval mode.

One data path (DESIGN.md):

    encoder -> (mean, logvar) -> train: mean + sigma * eps, TDC loss
                              -> eval:  GQ search -> indices -> codebook lookup (z_hat)

The forward contract follows vector-quantize-pytorch: ``quantized, indices, loss = q(x)``.
``x`` carries mean and log-variance, either as one tensor with ``2 * dim`` channels (mean
first, like diffusers' "moments") or as a ``(mean, logvar)`` pair / ``q(mean, logvar)``.

Layouts (indices are always channel-last, as vector-quantize-pytorch's: the ``G`` sub-codebook
indices of a token sit on the last axis; a host that wants another layout converts once, in its
adapter):

* ``accept_image_fmap=True``: ``(B, 2*dim, H, W)`` -> quantized ``(B, dim, H, W)``,
  indices ``(B, H, W, G)``;
* sequences, ``channel_last=True`` (default): ``(B, N, 2*dim)`` -> ``(B, N, dim)``,
  indices ``(B, N, G)``; ``channel_last=False``: ``(B, 2*dim, N)`` -> ``(B, dim, N)``;
* single tokens: ``(B, 2*dim)`` -> ``(B, dim)``, indices ``(B, G)``;

where ``G = dim / codebook_dim`` sub-codebooks per token share one ``(K, m)`` codebook.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from torch import nn

from . import codebook as cbm
from .rate import LOGVAR_RANGE, bits_per_pixel, bits_per_token, group_rates
from .search import DEFAULT_TILE_K, DEFAULT_TILE_N, codebook_features, gq_search
from .tdc import TargetDivergenceConstraint

_GROUPING_CODES = {g: i for i, g in enumerate(cbm.GROUPINGS)}
_KIND_CODES = {k: i for i, k in enumerate(cbm.CODEBOOK_KINDS)}
CONFIG_FIELDS = ("codebook_size (K)", "codebook_dim (m)", "grouping", "codebook kind", "seed", "dim", "beta")


def beta_to_int(beta: float) -> int:
    """The float64 bit pattern of ``beta`` as an int64 (so it fits the int64 config buffer)."""
    return struct.unpack("<q", struct.pack("<d", float(beta)))[0]


def int_to_beta(value: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(value)))[0]


def decode_config(values: list[int]) -> dict:
    """The ``gq_config`` buffer as a dict (older 6-field buffers have no beta)."""
    out = {
        "codebook_size": values[0],
        "codebook_dim": values[1],
        "grouping": cbm.GROUPINGS[values[2]] if 0 <= values[2] < len(cbm.GROUPINGS) else values[2],
        "codebook": cbm.CODEBOOK_KINDS[values[3]] if 0 <= values[3] < len(cbm.CODEBOOK_KINDS) else values[3],
        "seed": values[4],
        "dim": values[5],
    }
    if len(values) > 6:
        out["beta"] = int_to_beta(values[6])
    return out


@dataclass
class CodebookUsage:
    """Codebook usage of a set of indices."""

    used: int  # distinct codes hit
    codebook_size: int
    usage: float  # used / K
    entropy_bits: float
    perplexity: float  # 2 ** entropy
    counts: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {"usage": self.usage, "used": float(self.used), "entropy_bits": self.entropy_bits, "perplexity": self.perplexity}


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> CodebookUsage:
    """Usage fraction, entropy (bits) and perplexity of ``indices`` over a codebook of size K."""
    idx = indices.detach().reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got range [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx.cpu(), minlength=codebook_size)
    total = max(int(counts.sum()), 1)
    p = counts.double() / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log2()).sum())
    used = int((counts > 0).sum())
    return CodebookUsage(used, codebook_size, used / codebook_size, entropy, 2.0**entropy, counts)


class GaussianQuantizer(nn.Module):
    """Gaussian Quant (GQ) bottleneck with the Target Divergence Constraint (TDC).

    Args:
        dim: latent channels C per token (the mean's channels; the input carries 2*C).
        codebook_size: K, the number of Gaussian codewords (a power of two is recommended:
            the TDC target is ``log2 K`` bits per sub-codebook).
        codebook_dim: m, channels per sub-codebook (must divide ``dim``; default ``dim``).
        grouping: ``"contiguous"`` (group g = channels g*m..g*m+m-1) or ``"strided"``
            (the authors' layout: channels g, g+G, ...).
        codebook: ``"sobol"`` (scrambled Sobol -> inverse normal CDF, the reference) or ``"iid"``.
        seed: codebook seed (42 = the reference).
        beta: prior weight in the score ``log N(c; mu, s^2) - beta log N(c; 0, I)``; 1 = the
            paper's default, 0 = sigma-weighted nearest neighbour.
        accept_image_fmap / channel_last: input layout (see module docstring).
        tolerance, lam_factor, lam_*_range: TDC settings (:class:`TargetDivergenceConstraint`);
            ``lam_factor`` is ``1 + eps``.
        tdc_rule, tdc_quantile: the TDC rule (``"band"``, the default, or ``"reference"``, the
            authors' rule) and the band rule's quantile (see :mod:`gq_plugin.tdc`).
        tdc_auto_step: update the TDC multipliers inside every training forward with grads
            enabled. Set False and call :meth:`tdc_step` after each autoencoder optimizer
            step when you control the loop (so discriminator passes never move them).
        search_in_train: also run the GQ search in training mode (indices returned; costs a
            search per step). Otherwise training returns ``indices=None``.
        search_backend: force ``"torch"``, ``"cpp"`` or ``"cuda"`` (default: fastest available;
            ``GQ_SEARCH_BACKEND`` also works).
        check_finite: raise ``ValueError`` on NaN/inf mean or logvar (one host sync per call).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        *,
        grouping: str = "contiguous",
        codebook: str = "sobol",
        seed: int = 42,
        beta: float = 1.0,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        tolerance: float = 0.5,
        lam_factor: float = 1.01,
        lam_max_range: tuple[float, float] | None = None,
        lam_min_range: tuple[float, float] | None = None,
        lam_global_range: tuple[float, float] = (1e-3, 1e3),
        tdc_rule: str = "band",
        tdc_quantile: float = 0.99,
        tdc_auto_step: bool = True,
        sync_distributed: bool = True,
        logvar_range: tuple[float, float] = LOGVAR_RANGE,
        search_in_train: bool = False,
        search_backend: str | None = None,
        check_finite: bool = True,
        tile_n: int = DEFAULT_TILE_N,
        tile_k: int = DEFAULT_TILE_K,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        cbm.check_codebook_args(codebook_size, codebook_dim, codebook)
        self.num_codebooks = cbm.check_grouping(dim, codebook_dim, grouping)
        if not math.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        if not lam_factor > 1.0:
            raise ValueError(f"lam_factor must be > 1, got {lam_factor}")
        if not logvar_range[0] < logvar_range[1]:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {logvar_range}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.grouping = grouping
        self.codebook_kind = codebook
        self.seed = int(seed)
        self.beta = float(beta)
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        self.search_in_train = search_in_train
        self.search_backend = search_backend
        self.check_finite = check_finite
        self.tile_n, self.tile_k = int(tile_n), int(tile_k)

        cb = cbm.make_codebook(codebook_size, codebook_dim, self.seed, codebook)
        self.register_buffer("_codebook", cb, persistent=False)
        self.register_buffer("_codebook_features", codebook_features(cb), persistent=False)
        self.fingerprint = cbm.codebook_fingerprint(cb)
        self.register_buffer("codebook_fingerprint", cbm.fingerprint_to_tensor(self.fingerprint))
        self.register_buffer("gq_config", self._config_tensor())
        self.tdc = TargetDivergenceConstraint(
            target_bits=math.log2(codebook_size),
            tolerance=tolerance,
            eps=lam_factor - 1.0,
            lam_max_range=lam_max_range,
            lam_min_range=lam_min_range,
            lam_global_range=lam_global_range,
            rule=tdc_rule,
            quantile=tdc_quantile,
            auto_step=tdc_auto_step,
            sync_distributed=sync_distributed,
        )

    # ------------------------------------------------------------------ config / state

    def _config_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.codebook_size, self.codebook_dim, _GROUPING_CODES[self.grouping], _KIND_CODES[self.codebook_kind], self.seed, self.dim,
             beta_to_int(self.beta)],
            dtype=torch.int64,
        )

    def config(self) -> dict:
        """Constructor arguments that define the discrete representation (for save/load)."""
        return {
            "dim": self.dim,
            "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim,
            "grouping": self.grouping,
            "codebook": self.codebook_kind,
            "seed": self.seed,
            "beta": self.beta,
            "tolerance": self.tdc.tolerance,
            "lam_factor": 1.0 + self.tdc.eps,
            "tdc_rule": self.tdc.rule,
            "tdc_quantile": self.tdc.quantile,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"num_codebooks={self.num_codebooks}, grouping={self.grouping!r}, codebook={self.codebook_kind!r}, "
            f"seed={self.seed}, beta={self.beta}, fingerprint={self.fingerprint}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        cfg = state_dict.get(prefix + "gq_config")
        if cfg is not None:
            theirs = decode_config(cfg.reshape(-1).tolist())
            mine = decode_config(self._config_tensor().tolist())
            keys = list(theirs)  # a 6-field buffer (no beta) is checked on the fields it has
            diffs = [
                f"{name}: checkpoint {theirs[k]!r} vs model {mine[k]!r}"
                for name, k in zip(CONFIG_FIELDS, keys)
                if theirs[k] != mine[k]
            ]
            if diffs:
                raise ValueError("GQ checkpoint does not match this quantizer: " + "; ".join(diffs))
            if "beta" not in theirs:  # upgrade a 6-field buffer in place
                state_dict[prefix + "gq_config"] = self._config_tensor()
        fp = state_dict.get(prefix + "codebook_fingerprint")
        if fp is not None:
            theirs = cbm.tensor_to_fingerprint(fp)
            if theirs != self.fingerprint:
                raise ValueError(
                    f"GQ codebook fingerprint mismatch: checkpoint {theirs} vs model {self.fingerprint} "
                    "(the codebook generator differs: seed, kind or library version); refusing to load"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The codebook is part of the discrete representation: keep it exact float32 whatever
        # dtype the model is cast to (e.g. vae.half()).
        if self._codebook.dtype != torch.float32:
            device = self._codebook.device
            cb = cbm.make_codebook(self.codebook_size, self.codebook_dim, self.seed, self.codebook_kind, device=device)
            self._codebook = cb
            self._codebook_features = codebook_features(cb)
        return self

    @property
    def codebook(self) -> torch.Tensor:
        """The fixed ``(K, m)`` float32 codebook."""
        return self._codebook

    @property
    def bits_per_token(self) -> float:
        return bits_per_token(self.num_codebooks, self.codebook_size)

    def bits_per_pixel(self, pixels_per_token: int) -> float:
        """Nominal bpp for a model whose tokens each cover ``pixels_per_token`` pixels."""
        return bits_per_pixel(self.num_codebooks, self.codebook_size, pixels_per_token)

    # ------------------------------------------------------------------ layout helpers

    def _channel_axis(self, ndim: int, name: str) -> int:
        if self.accept_image_fmap:
            if ndim != 4:
                raise ValueError(f"{name} must be (B, C, H, W) with accept_image_fmap=True, got {ndim} dims")
            return 1
        if ndim == 2:
            return 1
        if ndim != 3:
            raise ValueError(
                f"{name} must be (B, N, C) or (B, C) (or (B, C, H, W) with accept_image_fmap=True), got {ndim} dims"
            )
        return 2 if self.channel_last else 1

    def _split(self, x, logvar) -> tuple[torch.Tensor, torch.Tensor, int]:
        if logvar is None and isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"x as a sequence must be (mean, logvar), got {len(x)} items")
            x, logvar = x
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor, got {type(x).__name__}")
        axis = self._channel_axis(x.ndim, "x")
        if logvar is None:
            if x.shape[axis] != 2 * self.dim:
                raise ValueError(
                    f"x must carry mean and logvar: 2*dim={2 * self.dim} channels on axis {axis}, got {x.shape[axis]} "
                    f"(shape {tuple(x.shape)})"
                )
            mean, logvar = x.chunk(2, dim=axis)
        else:
            mean = x
            if not isinstance(logvar, torch.Tensor) or logvar.shape != mean.shape:
                raise ValueError(
                    f"logvar must be a tensor shaped like mean {tuple(mean.shape)}, got "
                    f"{tuple(logvar.shape) if isinstance(logvar, torch.Tensor) else type(logvar).__name__}"
                )
            if mean.shape[axis] != self.dim:
                raise ValueError(f"mean must have dim={self.dim} channels on axis {axis}, got {mean.shape[axis]} (shape {tuple(mean.shape)})")
        if self.check_finite:
            for name, t in (("mean", mean), ("logvar", logvar)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        return mean, logvar, axis

    def _to_groups(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """(layout) -> (B, *spatial, G, m), float32."""
        return cbm.group_channels(t.float().movedim(axis, -1), self.codebook_dim, self.grouping)

    def _from_channel_last(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        return t.movedim(-1, axis)

    # ------------------------------------------------------------------ core ops

    def rates(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Group rates in bits, shaped like the indices: (B, H, W, G) / (B, N, G) / (B, G)."""
        mean, logvar, axis = self._split(x, logvar)
        # clamp like forward() and the search do, so rates() matches the TDC loss of forward()
        lv = logvar.float().clamp(*self.logvar_range)
        return group_rates(mean.float().movedim(axis, -1), lv.movedim(axis, -1), self.codebook_dim, self.grouping)

    @torch.no_grad()
    def quantize(self, x, logvar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GQ in any mode: ``(z_hat, indices)``; z_hat in the mean's layout and dtype."""
        mean, logvar, axis = self._split(x, logvar)
        return self._quantize(mean, logvar, axis)

    def _quantize(self, mean: torch.Tensor, logvar: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        mu_g = self._to_groups(mean, axis)
        lv_g = self._to_groups(logvar, axis).clamp(*self.logvar_range)
        lead = mu_g.shape[:-1]  # (B, *spatial, G)
        with torch.no_grad():
            idx = gq_search(
                mu_g.reshape(-1, self.codebook_dim),
                lv_g.reshape(-1, self.codebook_dim),
                self._codebook,
                self.beta,
                backend=self.search_backend,
                features=self._codebook_features,
                tile_n=self.tile_n,
                tile_k=self.tile_k,
            ).reshape(lead)
        z = cbm.ungroup_channels(self._codebook[idx], self.grouping)
        z_hat = self._from_channel_last(z, axis).to(mean.dtype)
        return z_hat, idx

    @torch.no_grad()
    def encode_indices(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """GQ indices of a posterior (any mode), channel-last: (B, H, W, G) / (B, N, G) / (B, G)."""
        return self.quantize(x, logvar)[1]

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codewords per group, channel-last: ``(..., G, m)`` in the (B, *spatial) order."""
        idx = self._check_indices(indices)
        return self._codebook[idx]

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be a tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if self.accept_image_fmap:
            if indices.ndim != 4 or indices.shape[-1] != self.num_codebooks:
                raise ValueError(f"indices must be (B, H, W, {self.num_codebooks}), got {tuple(indices.shape)}")
        elif indices.ndim not in (2, 3) or indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"indices must be (B, N, {self.num_codebooks}) or (B, {self.num_codebooks}), got {tuple(indices.shape)}")
        idx = indices
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        return idx.long()

    def dequant(self, indices: torch.Tensor) -> torch.Tensor:
        """Exact inverse of the index step: ``codebook[indices]`` placed back into its channels.

        ``indices`` in the core layout (``(B, H, W, G)`` / ``(B, N, G)`` / ``(B, G)``); returns the
        quantized latent in the layout ``forward`` returns (float32).
        """
        z = cbm.ungroup_channels(self._codebook[self._check_indices(indices)], self.grouping)
        if self.accept_image_fmap:
            return z.permute(0, 3, 1, 2)
        if z.ndim == 3 and not self.channel_last:
            return z.transpose(1, 2)
        return z

    get_output_from_indices = dequant
    indices_to_codes = dequant

    def codebook_usage(self, indices: torch.Tensor) -> CodebookUsage:
        """Usage, entropy and perplexity of ``indices`` over this codebook."""
        return codebook_usage(self._check_indices(indices), self.codebook_size)

    def tdc_step(self) -> bool:
        """Apply one TDC multiplier update (call once per autoencoder optimizer step)."""
        return self.tdc.step()

    # ------------------------------------------------------------------ forward

    def forward(self, x, logvar: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """``(quantized, indices, loss)``.

        Training: ``quantized`` is the reparameterised sample ``mean + sigma * eps``
        (differentiable), ``loss`` the TDC loss, ``indices`` None unless ``search_in_train``.
        Eval: ``quantized`` is the GQ codeword latent, ``indices`` int64, ``loss`` 0.
        """
        mean, logvar, axis = self._split(x, logvar)
        if not self.training:
            z_hat, idx = self._quantize(mean, logvar, axis)
            return z_hat, idx, torch.zeros((), device=mean.device)
        mean32 = mean.float()
        lv32 = logvar.float().clamp(*self.logvar_range)
        std = torch.exp(0.5 * lv32)
        noise = torch.randn(mean32.shape, generator=generator, device=mean32.device, dtype=mean32.dtype)
        sample = (mean32 + std * noise).to(mean.dtype)
        rates = group_rates(mean32.movedim(axis, -1), lv32.movedim(axis, -1), self.codebook_dim, self.grouping)
        loss = self.tdc(rates)
        idx = None
        if self.search_in_train:
            idx = self._quantize(mean.detach(), logvar.detach(), axis)[1]
        return sample, idx, loss
