"""One "images in, indices out / indices in, images out" interface for every tokenizer the library trains.

A tokenizer is a trained autoencoder with a discrete bottleneck: a GQ-patched VAE (``gq train`` with
the ``gq`` quantizer, or any ``save_pretrained`` GQ model) or a registry baseline (``vq``, ``fsq``,
``lfq``, ``bsq``, ``tokenbridge``: a diffusers ``AutoencoderKL`` plus the ``quantizer.pt`` that
``gq train`` saves beside ``vae/``). :func:`load_tokenizer` tells them apart; both give

* ``encode(images (B, 3, H, W) in [-1, 1]) -> indices (B, G, h, w)`` int64 in ``[0, codebook_size)``;
* ``decode(indices) -> images (B, 3, H, W)`` in ``[-1, 1]``;
* ``header(shape, image_size, extra)``: the :class:`~gq_plugin.tokens.TokenHeader` its token files carry;
* ``describe()``: the codebook fields (``codebook_size``, ``codebook_dim``, ``grouping``,
  ``codebook``, ``seed``, ``fingerprint``) and ``check_tokens(fields)``, which refuses token files made
  by another tokenizer with one ``ValueError`` naming every difference.

Token layout: always ``B,G,H,W``: ``G = C / m`` GQ sub-codebooks per latent position, ``G = 1`` for
VQ / FSQ / LFQ / BSQ (FSQ's product of levels is one index: ``codebook_size = prod(levels)``),
``G = C`` for TokenBridge (one index per channel).
"""

from __future__ import annotations

import abc
import hashlib
import os
from pathlib import Path

import torch

from ..tokens import LEARNED_CODEBOOK, TokenHeader

#: codebook fields that must agree between token files and the tokenizer that decodes them
CODEBOOK_FIELDS = ("codebook_size", "codebook_dim", "grouping", "codebook", "seed", "fingerprint")


class Tokenizer(abc.ABC):
    """Base class: a loaded tokenizer (eval mode). Subclasses set ``vae``, ``kind``, ``model_dir``,
    ``model_id``, ``codebook_size``, ``groups`` and implement :meth:`encode` / :meth:`decode`."""

    kind: str
    model_dir: str
    model_id: str
    codebook_size: int
    groups: int

    @property
    def factor(self) -> int:
        """Pixels per latent position along one side."""
        from .models import downsampling_factor

        return downsampling_factor(self.vae)

    def to(self, device) -> "Tokenizer":
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> indices ``(B, G, h, w)``."""

    @abc.abstractmethod
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, G, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1]."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """The codebook fields a token file records (:data:`CODEBOOK_FIELDS`)."""

    def header(self, shape, image_size=None, extra=None, layout: str | None = None) -> TokenHeader:
        """The header of a token file holding ``shape`` indices made by this tokenizer (``layout``
        defaults by the number of dims: ``B,G,H,W`` images, ``B,G,T,H,W`` video)."""
        d = self.describe()
        if layout is None:
            layout = {5: "B,G,T,H,W", 4: "B,G,H,W"}.get(len(shape))
            if layout is None:
                raise ValueError(f"no default token layout for a {len(shape)}-dim shape {tuple(shape)}: pass layout=")
        return TokenHeader(d["codebook_size"], d["codebook_dim"], d["grouping"], d["codebook"], d["seed"], d["fingerprint"],
                           tuple(int(s) for s in shape), layout, self.model_id,
                           None if image_size is None else (int(image_size[0]), int(image_size[1])), dict(extra or {}))

    def check_tokens(self, fields: dict, what: str = "tokens") -> None:
        """Raise one ``ValueError`` when ``fields`` (a token manifest or header as a dict) were not
        made by this tokenizer: every differing codebook field, the model id and G are named."""
        mine = self.describe()
        diffs = [f"{k}: tokens {fields.get(k)!r} vs tokenizer {mine[k]!r}" for k in CODEBOOK_FIELDS if fields.get(k) != mine[k]]
        shape = fields.get("token_shape")
        if shape is not None and len(shape) == 3 and shape[0] != self.groups:
            diffs.append(f"codes per position G: tokens {shape[0]} vs tokenizer {self.groups}")
        if not diffs and fields.get("model_id") and fields["model_id"] != self.model_id:
            diffs.append(f"model_id: tokens {fields['model_id']!r} vs tokenizer {self.model_id!r} (same codebook, other weights)")
        if diffs:
            raise ValueError(f"{what} were made by another tokenizer than {self.model_dir!r} ({self.kind}): " + "; ".join(diffs))


class GQTokenizer(Tokenizer):
    """A GQ-patched diffusers VAE: ``encode_indices`` / ``decode_indices``."""

    def __init__(self, model_dir, what: str = "--tokenizer") -> None:
        from .codec import load_model, model_id

        self._bind(load_model(model_dir, what), str(model_dir), model_id(model_dir, what))

    @classmethod
    def from_vae(cls, vae, model_id: str = "") -> "GQTokenizer":
        """A tokenizer over a GQ-patched model already in memory (e.g. a video VAE whose indices
        were computed elsewhere; :func:`~gq_plugin.lab.tokenize_dataset.write_token_shards`)."""
        if not hasattr(vae, "gq_quantizer"):
            raise ValueError("vae is not GQ-patched (no gq_quantizer): patch it with gq_plugin.adapters first")
        tok = cls.__new__(cls)
        tok._bind(vae, "", model_id)
        return tok

    def _bind(self, vae, model_dir: str, model_id: str) -> None:
        self.vae, self.kind, self.model_dir, self.model_id = vae, "gq", model_dir, model_id
        q = vae.gq_quantizer
        self.codebook_size = int(q.codebook_size)
        self.groups = int(q.num_codebooks)

    def describe(self) -> dict:
        q = self.vae.gq_quantizer
        return {"codebook_size": int(q.codebook_size), "codebook_dim": int(q.codebook_dim), "grouping": q.grouping,
                "codebook": q.codebook_kind, "seed": int(q.seed), "fingerprint": q.fingerprint}

    @torch.no_grad()
    def encode(self, images):
        return self.vae.encode_indices(images.to(self.device))

    @torch.no_grad()
    def decode(self, indices):
        return self.vae.decode_indices(indices.to(self.device)).sample.clamp(-1, 1)


class BaselineTokenizer(Tokenizer):
    """A registry baseline: ``AutoencoderKL`` (posterior mean) -> quantizer -> decoder, rebuilt from
    the training run's ``config.yaml`` (its ``quantizer`` section) and ``quantizer.pt``."""

    def __init__(self, model_dir, what: str = "--tokenizer") -> None:
        from .models import QUANTIZER_STATE, _diffusers, latent_channels, load_quantizer_state, resolve_model_dir

        vae_dir = Path(resolve_model_dir(model_dir, what))
        state_file = next((p for p in (vae_dir / QUANTIZER_STATE, vae_dir.parent / QUANTIZER_STATE) if p.is_file()), None)
        if state_file is None:
            raise ValueError(f"{what} {str(model_dir)!r} is neither a GQ model nor a baseline checkpoint (no {QUANTIZER_STATE} beside vae/)")
        qcfg = _run_quantizer_section(vae_dir, what, model_dir)
        self.vae = _diffusers().from_pretrained(str(vae_dir)).eval()
        self.quantizer = _build_baseline(qcfg, latent_channels(self.vae))
        try:
            self.quantizer.load_state_dict(load_quantizer_state(state_file))
        except RuntimeError as e:
            raise ValueError(f"{state_file} does not fit the {qcfg['name']} quantizer of the run's config.yaml: {' '.join(str(e).split())[:200]}") from None
        self.quantizer.eval()
        self.kind = str(qcfg["name"])
        self.model_dir = str(model_dir)
        self.codebook_size = int(self.quantizer.codebook_size)
        self.groups = latent_channels(self.vae) if self.kind == "tokenbridge" else 1
        h = hashlib.sha256()
        for f in (sorted(vae_dir.glob("*.safetensors")) or sorted(vae_dir.glob("*.bin")))[:1] + [state_file]:
            h.update(f.read_bytes())
        self._fingerprint = f"{self.kind}:" + hashlib.sha256(state_file.read_bytes()).hexdigest()[:16]
        self.model_id = f"{vae_dir.resolve().name if vae_dir.name != 'vae' else vae_dir.resolve().parent.name}:{h.hexdigest()[:12]}"

    def to(self, device):
        super().to(device)
        self.quantizer.to(device)
        return self

    def describe(self) -> dict:
        channels = int(self.vae.config.latent_channels)
        return {"codebook_size": self.codebook_size, "codebook_dim": channels // self.groups, "grouping": "contiguous",
                "codebook": LEARNED_CODEBOOK, "seed": 0, "fingerprint": self._fingerprint}

    @torch.no_grad()
    def encode(self, images):
        z = self.vae.encode(images.to(self.device)).latent_dist.mean
        _, idx, _ = self.quantizer(z)
        return idx.long().unsqueeze(1) if idx.ndim == 3 else idx.long()

    @torch.no_grad()
    def decode(self, indices):
        indices = indices.to(self.device)
        z = self.quantizer.decode_indices(indices[:, 0] if self.groups == 1 else indices)
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)


def _run_quantizer_section(vae_dir: Path, what: str, model_dir) -> dict:
    """The ``quantizer`` section of the ``config.yaml`` that ``gq train`` wrote into the run folder
    (looked for beside the checkpoint and up to two folders above it)."""
    from omegaconf import OmegaConf

    start = vae_dir.resolve()
    for d in (start, start.parent, start.parent.parent, start.parent.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
            if isinstance(cfg, dict) and isinstance(cfg.get("quantizer"), dict) and cfg["quantizer"].get("name"):
                return cfg["quantizer"]
    raise ValueError(f"{what} {str(model_dir)!r}: no config.yaml with a quantizer section (written by `gq train`) in the run folder")


def _build_baseline(qcfg: dict, channels: int):
    """A registry baseline from a recipe's quantizer section (only the registry's arguments are passed)."""
    from .config import BASELINE_KEYS
    from .registry import build_quantizer

    name = qcfg["name"]
    if name in ("gq", "kl"):
        raise ValueError(f"quantizer {name!r} has no baseline codebook to load")
    kwargs = {k: v for k, v in qcfg.items() if k in (*BASELINE_KEYS, "codebook_size") and k not in ("aux_weight",) and v is not None}
    return build_quantizer(name, channels, **kwargs)


def is_gq_model(model_dir, what: str = "--tokenizer") -> bool:
    """Whether ``model_dir`` holds a GQ-patched VAE (its ``config.json`` carries the GQ settings)."""
    import json

    from ..adapters.diffusers_vae import CONFIG_KEY
    from .models import resolve_model_dir

    cfg = json.loads((Path(resolve_model_dir(model_dir, what)) / "config.json").read_text())
    return CONFIG_KEY in cfg


def load_tokenizer(model_dir: str | os.PathLike, what: str = "--tokenizer") -> Tokenizer:
    """The tokenizer in ``model_dir`` (a checkpoint dir such as ``runs/demo/final``, or its ``vae/``):
    :class:`GQTokenizer` for a GQ model, else :class:`BaselineTokenizer`. Errors name ``what``."""
    return GQTokenizer(model_dir, what) if is_gq_model(model_dir, what) else BaselineTokenizer(model_dir, what)


__all__ = ["Tokenizer", "GQTokenizer", "BaselineTokenizer", "load_tokenizer", "is_gq_model", "CODEBOOK_FIELDS"]
