"""``GaussianQuantizer``: a Gaussian-VAE bottleneck that becomes a VQ bottleneck in eval mode.

One data path (docs/design.md, section 1; the layers and where to add a host or a backend: sections 2-3):

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

import dataclasses
import json
import math
import operator
import struct
from dataclasses import dataclass, field

import torch
from torch import nn

from . import codebook as cbm
from .rate import LOGVAR_RANGE, bits_per_pixel, bits_per_token, group_rates, reparameterize
from .search import DEFAULT_TILE_K, DEFAULT_TILE_N, backend_names, codebook_features, gq_search
from .tdc import TargetDivergenceConstraint, TDCSettings

SETTINGS_FORMAT = 2  # version of GQConfig.to_dict (1 = the flat vae.config["gq"] of gq-plugin <= 0.1)
#: The fields that define the discrete representation (checked when a checkpoint loads), with
#: the names error messages use.
REPRESENTATION = {"codebook_size": "codebook_size (K)", "codebook_dim": "codebook_dim (m)", "grouping": "grouping",
                  "codebook": "codebook kind", "seed": "seed", "dim": "dim", "beta": "beta"}


def _int(name: str, v, low: int = 1) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        i = None
    if isinstance(v, bool) or i is None or i < low:
        raise ValueError(f"{name} must be a {'positive int' if low == 1 else f'int >= {low}'}, got {v!r}")
    return i


@dataclass(frozen=True)
class GQConfig:
    """The GQ + TDC settings of a :class:`GaussianQuantizer`: the single source of their names,
    defaults and validation, serialised one way (:meth:`to_dict` / :meth:`to_json`).

    Representation (a checkpoint must match these): ``dim`` (latent channels C),
    ``codebook_size`` (K), ``codebook_dim`` (m, default ``dim``), ``grouping``, ``codebook``,
    ``seed``, ``beta``. Numerics: ``logvar_range``. TDC: ``tdc`` (a :class:`~gq_plugin.tdc.TDCSettings`;
    its fields are also accepted flat, e.g. ``tolerance=``). Runtime: ``tdc_auto_step``,
    ``sync_distributed``, ``search_in_train``, ``search_backend``, ``check_finite``, ``tile_n``, ``tile_k``.
    See :class:`GaussianQuantizer` for what each does. Hosts that say ``K``/``m`` map them here by
    position: ``GaussianQuantizer(C, K, m, **settings)``.
    """

    dim: int
    codebook_size: int
    codebook_dim: int | None = None
    grouping: str = "contiguous"
    codebook: str = "sobol"
    seed: int = 42
    beta: float = 1.0
    logvar_range: tuple[float, float] = LOGVAR_RANGE
    tdc: TDCSettings = field(default_factory=TDCSettings)
    tdc_auto_step: bool = True
    sync_distributed: bool = True
    search_in_train: bool = False
    search_backend: str | None = None
    check_finite: bool = True
    tile_n: int = DEFAULT_TILE_N
    tile_k: int = DEFAULT_TILE_K

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once
        set_(self, "dim", _int("dim", self.dim))
        if self.codebook_dim is None:
            set_(self, "codebook_dim", self.dim)
        cbm.check_codebook_args(self.codebook_size, self.codebook_dim, self.codebook)
        cbm.check_grouping(self.dim, self.codebook_dim, self.grouping)
        set_(self, "seed", _int("seed", self.seed, low=0))
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite number, got {self.beta!r}")
        set_(self, "beta", float(self.beta))
        try:
            lo, hi = (float(v) for v in self.logvar_range)
        except (TypeError, ValueError):
            raise ValueError(f"logvar_range must be a (low, high) pair, got {self.logvar_range!r}") from None
        if not lo < hi:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {(lo, hi)}")
        set_(self, "logvar_range", (lo, hi))
        if isinstance(self.tdc, dict):
            set_(self, "tdc", TDCSettings.from_dict(self.tdc))
        elif not isinstance(self.tdc, TDCSettings):
            raise ValueError(f"tdc must be a TDCSettings or a dict, got {type(self.tdc).__name__}")
        for name in ("tdc_auto_step", "sync_distributed", "search_in_train", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        b = self.search_backend
        if b is not None and (not isinstance(b, str) or b.lower() not in (*backend_names(), "auto")):
            raise ValueError(f"search_backend must be None, 'auto' or one of {backend_names()}, got {b!r}")
        set_(self, "tile_n", _int("tile_n", self.tile_n))
        set_(self, "tile_k", _int("tile_k", self.tile_k))

    @property
    def num_codebooks(self) -> int:
        return self.dim // self.codebook_dim

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every accepted setting name, flat (the TDC fields included, ``tdc`` itself not)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "tdc") + TDCSettings.names()

    @classmethod
    def from_dict(cls, d: dict, **given) -> GQConfig:
        """Settings from :meth:`to_dict` output, a flat dict of :meth:`names`, or the flat
        ``vae.config["gq"]`` of format 1; ``given`` adds/overrides keys (e.g. ``dim=``).
        ``ValueError`` names an unknown key, a bad value or a newer format."""
        d = {**d, **given}
        fmt = d.pop("format", SETTINGS_FORMAT)
        if not isinstance(fmt, int) or fmt > SETTINGS_FORMAT:
            raise ValueError(f"GQ settings format {fmt!r} is newer than this gq-plugin understands ({SETTINGS_FORMAT})")
        tdc = dict(d.pop("tdc", None) or {})
        tdc.update({k: d.pop(k) for k in TDCSettings.names() if k in d})
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown GQ setting(s) {unknown}; valid: {sorted(cls.names())}")
        missing = [k for k in ("dim", "codebook_size") if k not in d]
        if missing:
            raise ValueError(f"GQ settings need {missing}")
        return cls(**d, tdc=TDCSettings.from_dict(tdc))

    def to_dict(self) -> dict:
        """JSON-able nested dict: ``{"format": 2, <fields>, "tdc": {...}}`` (pairs as lists)."""
        out = {"format": SETTINGS_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.as_dict() if isinstance(v, TDCSettings) else list(v) if isinstance(v, tuple) else v
        return out

    def flat(self) -> dict:
        """``{name: value}`` for every name in :meth:`names` (TDC fields flat; JSON-able)."""
        d = self.to_dict()
        del d["format"]
        d.update(d.pop("tdc"))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GQConfig:
        return cls.from_dict(json.loads(text))

    def to_tensor(self) -> torch.Tensor:
        """:meth:`to_json` as UTF-8 bytes in a uint8 tensor (the ``gq_config`` state-dict entry)."""
        return torch.frombuffer(bytearray(self.to_json().encode()), dtype=torch.uint8).clone()

    def replace(self, **flat) -> GQConfig:
        """A copy with some settings changed (flat names, validated)."""
        return GQConfig.from_dict({**self.to_dict(), **flat})


def read_config_tensor(t: torch.Tensor) -> dict:
    """A checkpoint's ``gq_config`` entry as a dict: :meth:`GQConfig.to_dict` for uint8 JSON, or
    the representation fields of the int64 buffer written by gq-plugin <= 0.1 (``[K, m, grouping,
    kind, seed, dim]`` plus ``beta`` bit-cast into int64 since it was stored)."""
    if t.dtype == torch.uint8:
        try:
            out = json.loads(bytes(t.reshape(-1).tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"gq_config: not a GQ settings JSON ({e})") from None
        if not isinstance(out, dict):
            raise ValueError(f"gq_config: expected a JSON object, got {type(out).__name__}")
        return out
    if t.dtype != torch.int64 or t.ndim != 1 or t.numel() not in (6, 7):
        raise ValueError(f"GQ checkpoint buffer gq_config is damaged: expected uint8 JSON or 6 or 7 int64 values, "
                         f"got {t.dtype} of shape {tuple(t.shape)}")
    v = [int(x) for x in t.tolist()]
    out = {"codebook_size": v[0], "codebook_dim": v[1],
           "grouping": cbm.GROUPINGS[v[2]] if 0 <= v[2] < len(cbm.GROUPINGS) else v[2],
           "codebook": cbm.CODEBOOK_KINDS[v[3]] if 0 <= v[3] < len(cbm.CODEBOOK_KINDS) else v[3],
           "seed": v[4], "dim": v[5]}
    if len(v) == 7:
        out["beta"] = struct.unpack("<d", struct.pack("<q", v[6]))[0]
    return out


def unpack_posterior(x, logvar):
    """``(x, logvar)`` from ``q(moments)``, ``q(mean, logvar)`` or ``q((mean, logvar))``; x must be a tensor."""
    if logvar is None and isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"x as a sequence must be (mean, logvar), got {len(x)} items")
        x, logvar = x
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    return x, logvar


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
    idx = cbm.as_index_tensor(indices).detach().reshape(-1)
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
        accept_image_fmap / channel_last: input layout (see module docstring); the host sets
            these, they are not settings.
        logvar_range: the log-variance clamp applied before the rates, the sample and the search.
        tolerance, lam_factor, lam_max_range, ...: TDC settings (:class:`~gq_plugin.tdc.TDCSettings`);
            ``lam_factor`` is ``1 + eps``.
        tdc_auto_step: update the TDC multipliers inside every training forward with grads
            enabled. Set False and call :meth:`tdc_step` after each autoencoder optimizer
            step when you control the loop (so discriminator passes never move them).
        search_in_train: also run the GQ search in training mode (indices returned; costs a
            search per step). Otherwise training returns ``indices=None``.
        search_backend: force ``"torch"``, ``"cpp"`` or ``"cuda"`` (default: fastest available;
            ``GQ_SEARCH_BACKEND`` also works).
        check_finite: in training (and :meth:`rates`), raise ``ValueError`` on NaN/inf mean or
            logvar and on a non-finite TDC loss (one host sync per call). The search (eval,
            :meth:`quantize`) always validates its input, whatever this flag says.
        tile_n / tile_k: search tile sizes.
        settings: a ready :class:`GQConfig` (then ``dim``/``codebook_size``/``codebook_dim`` must
            match it or be None, and keywords override it).

    Names, defaults and validation of all settings live in :class:`GQConfig` (the keywords
    above are its fields); :attr:`settings` returns the current ones.
    """

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        *,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        settings: GQConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        given = {k: v for k, v in (("dim", dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim)) if v is not None}
        if settings is not None:
            clash = {k: (v, getattr(settings, k)) for k, v in given.items() if v != getattr(settings, k)}
            if clash:
                raise ValueError(f"arguments disagree with settings: {clash}")
            cfg = settings.replace(**kwargs) if kwargs else settings
        else:
            cfg = GQConfig.from_dict({**given, **kwargs})
        self.dim, self.codebook_size, self.codebook_dim = cfg.dim, cfg.codebook_size, cfg.codebook_dim
        self.num_codebooks = cfg.num_codebooks
        self.grouping, self.codebook_kind, self.seed, self.beta = cfg.grouping, cfg.codebook, cfg.seed, cfg.beta
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.logvar_range = cfg.logvar_range
        self.search_in_train = cfg.search_in_train
        self.search_backend = cfg.search_backend
        self.check_finite = cfg.check_finite
        self.tile_n, self.tile_k = cfg.tile_n, cfg.tile_k

        cb = cbm.make_codebook(cfg.codebook_size, cfg.codebook_dim, cfg.seed, cfg.codebook)
        self.register_buffer("_codebook", cb, persistent=False)
        self.register_buffer("_codebook_features", codebook_features(cb), persistent=False)
        self.fingerprint = cbm.codebook_fingerprint(cb)
        self.register_buffer("codebook_fingerprint", cbm.fingerprint_to_tensor(self.fingerprint))
        self.tdc = TargetDivergenceConstraint(math.log2(cfg.codebook_size), settings=cfg.tdc,
                                              auto_step=cfg.tdc_auto_step, sync_distributed=cfg.sync_distributed)
        self.register_buffer("gq_config", cfg.to_tensor())

    # ------------------------------------------------------------------ settings / state

    @property
    def settings(self) -> GQConfig:
        """The current settings (attributes changed after construction included)."""
        return GQConfig(
            dim=self.dim, codebook_size=self.codebook_size, codebook_dim=self.codebook_dim, grouping=self.grouping,
            codebook=self.codebook_kind, seed=self.seed, beta=self.beta, logvar_range=self.logvar_range,
            tdc=self.tdc.settings, tdc_auto_step=self.tdc.auto_step, sync_distributed=self.tdc.sync_distributed,
            search_in_train=self.search_in_train, search_backend=self.search_backend, check_finite=self.check_finite,
            tile_n=self.tile_n, tile_k=self.tile_k,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"num_codebooks={self.num_codebooks}, grouping={self.grouping!r}, codebook={self.codebook_kind!r}, "
            f"seed={self.seed}, beta={self.beta}, fingerprint={self.fingerprint}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the current settings (attributes changed since construction included), never a stale buffer
        destination[prefix + "gq_config"] = self.settings.to_tensor().to(self.gq_config.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        cfg = state_dict.get(prefix + "gq_config")
        if cfg is not None:
            theirs = read_config_tensor(cfg)  # also the int64 buffer of older checkpoints
            mine = self.settings.to_dict()
            diffs = [f"{label}: checkpoint {theirs[k]!r} vs model {mine[k]!r}"
                     for k, label in REPRESENTATION.items() if k in theirs and theirs[k] != mine[k]]
            if diffs:
                raise ValueError("GQ checkpoint does not match this quantizer: " + "; ".join(diffs))
            # the settings are this model's (TDC/runtime settings may differ); keep its entry
            state_dict[prefix + "gq_config"] = self.gq_config.clone()  # (the buffer's shape: a no-op copy)
        fp = state_dict.get(prefix + "codebook_fingerprint")
        if fp is not None:
            if not torch.is_tensor(fp) or fp.dtype != torch.int64 or fp.numel() != 1:
                got = f"{fp.dtype} of shape {tuple(fp.shape)}" if torch.is_tensor(fp) else type(fp).__name__
                raise ValueError(f"GQ checkpoint buffer {prefix}codebook_fingerprint is damaged: expected one int64, got {got}")
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
        x, logvar = unpack_posterior(x, logvar)
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
        for name, t in (("mean", mean), ("logvar", logvar)):
            if not t.dtype.is_floating_point:  # a bool "posterior" would be all ones, an int one truncated
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        return mean, logvar, axis

    def _check_finite(self, mean: torch.Tensor, logvar: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """One host sync: NaN/inf in mean / logvar (and a non-finite TDC loss) raise ValueError."""
        flags = [torch.isfinite(mean).all(), torch.isfinite(logvar).all()]
        if loss is not None:
            flags.append(torch.isfinite(loss).all())
        ok = torch.stack(flags).tolist()
        if not ok[0]:
            raise ValueError("mean contains non-finite values (NaN or inf)")
        if not ok[1]:
            raise ValueError("logvar contains non-finite values (NaN or inf)")
        if loss is not None and not ok[2]:
            raise ValueError(
                f"TDC loss is not finite ({float(loss.reshape(-1)[~torch.isfinite(loss.reshape(-1))][0])}): the rates overflow float32, |mean| reaches "
                f"{float(mean.detach().abs().max()):.3g}; the encoder has diverged (lower the learning rate or resume from a checkpoint)"
            )

    def _to_groups(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """(layout) -> (B, *spatial, G, m), float32."""
        return cbm.group_channels(t.float().movedim(axis, -1), self.codebook_dim, self.grouping)

    def _from_channel_last(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        return t.movedim(-1, axis)

    # ------------------------------------------------------------------ core ops

    def rates(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Group rates in bits, shaped like the indices: (B, H, W, G) / (B, N, G) / (B, G)."""
        mean, logvar, axis = self._split(x, logvar)
        if self.check_finite:
            self._check_finite(mean, logvar)
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
        lv_g = self._to_groups(logvar, axis)
        lead = mu_g.shape[:-1]  # (B, *spatial, G)
        with torch.no_grad():  # gq_search validates (NaN/inf raise, one sync) and clamps logvar
            idx = gq_search(
                mu_g.reshape(-1, self.codebook_dim),
                lv_g.reshape(-1, self.codebook_dim),
                self._codebook,
                self.beta,
                backend=self.search_backend,
                features=self._codebook_features,
                tile_n=self.tile_n,
                tile_k=self.tile_k,
                logvar_range=self.logvar_range,
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
        indices = cbm.as_index_tensor(indices)  # int64; uint16/32/64 accepted, floats/bools refused
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
        sample = reparameterize(mean32, lv32, generator).to(mean.dtype)
        rates = group_rates(mean32.movedim(axis, -1), lv32.movedim(axis, -1), self.codebook_dim, self.grouping)
        if rates.numel() == 0:
            raise ValueError(f"x has no tokens to quantize (shape {tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(mean.shape)})")
        if self.check_finite:  # before the TDC records this batch's statistics
            self._check_finite(mean, logvar, self.tdc.per_sample_loss(rates.float()))
        loss = self.tdc(rates)
        idx = None
        if self.search_in_train:
            idx = self._quantize(mean.detach(), logvar.detach(), axis)[1]
        return sample, idx, loss
