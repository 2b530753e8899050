"""TokenBridge adapter: GQ where TokenBridge's per-channel post-training quantizer was.

Matched against YuqingWang1029/TokenBridge at commit 3ede2818251c7b47427c470e07da9409afd66f71
(``models/tokenbridge.py``, ``engine_tokenbridge.py``, ``reconstruction.py``). TokenBridge quantizes
the normalised VAE latents (``posterior.sample() * 0.2325``, patchified to ``(B, L, C)``) with
``TokenBridge.quantize(x) -> (indices (B, L, C), dequant (B, L, C))``, predicts a masked token's
16 per-channel codes with a channel-autoregressive head (``forward_channel_ar`` /
``_sample_channel_ar``), and maps sampled tokens back with ``reconstruction_values[tokens]`` + a
linear rescale in ``sample_tokens``.

:func:`swap_tokenbridge_quantizer` (``adapters.patch(model, "tokenbridge", ...)``) replaces, in
place and undoably (``adapters.unpatch``):

* ``quantize(x, logvar=None)`` by GQ. GQ needs the posterior, so the model input carries ``2C``
  channels: the normalised mean (``mean * scale``) then the raw log-variance
  (:func:`tokenbridge_gq_inputs`; TokenBridge's ``patchify`` keeps the halves apart). The search
  runs on the raw posterior, where the N(0, I) codebook lives; values come back in TokenBridge's
  normalised units. Tokens are ``(B, L, G)``, ``G = C / m`` codes over ``K`` codewords.
* the channel-AR head by a :class:`~gq_plugin.adapters._ar_head.GroupARHead` ``model.gq_ar_head``
  over the ``G`` K-way codes of a token (autoregressive across groups; factorised output layer
  for large ``K``), and ``forward(imgs, labels)`` / ``sample_tokens(...)`` by versions that reuse
  TokenBridge's own MAE encoder/decoder, masking and class embedding and call that head. The old
  head's modules are detached from the model while swapped (so DDP sees no unused parameters)
  and come back on unpatch. With ``ar_head="tokenbridge"`` (allowed for ``m = 1``,
  ``K = quant_levels``) TokenBridge's own head, forward and sampling are kept and
  ``reconstruction_values`` holds the GQ codewords instead.
* loading: a swapped model's ``state_dict`` loads strictly into a freshly swapped one. A
  ``load_state_dict`` pre-hook never lets a checkpoint put TokenBridge's own
  ``reconstruction_values`` / ``boundaries`` back (they are replaced by the GQ table, with a
  warning), and warns when the GQ head is missing from the checkpoint (an original TokenBridge
  checkpoint). :func:`load_tokenbridge_checkpoint` loads an original checkpoint strictly on the
  MAE trunk and reports what it left out.

:func:`gq_post_training_quantize` is the GQ counterpart of TokenBridge's
``post_training_quantize`` (``reconstruction.py``): a frozen VAE's posterior -> tokens and
dequantised latents, no training.

Note: GQ is nearly lossless only when each group's rate is <= log2 K bits; MAR's KL-16 VAE has
raw latents with std ~ 1/0.2325, far above 6 bits per channel, so fine-tune the VAE with TDC first.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..quantizer import GaussianQuantizer
from . import _patch
from ._ar_head import GroupARHead

TOKENBRIDGE_SCALE = 0.2325


def tokenbridge_gq_inputs(posterior=None, *, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                          scale: float = TOKENBRIDGE_SCALE) -> torch.Tensor:
    """``cat([mean * scale, logvar], dim=1)``: the ``(B, 2C, h, w)`` input of a swapped TokenBridge
    (instead of ``posterior.sample() * scale``)."""
    if posterior is not None:
        mean, logvar = posterior.mean, posterior.logvar
    if mean is None or logvar is None:
        raise ValueError("pass a posterior (with .mean/.logvar) or mean= and logvar=")
    return torch.cat([mean * scale, logvar], dim=1)


def _token_dim(model) -> int:
    for attr in ("token_embed_dim", "vae_embed_dim"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError("not a TokenBridge-like model: needs token_embed_dim or vae_embed_dim")


def quantize(self, x: torch.Tensor, logvar: torch.Tensor | None = None):
    """GQ replacement of ``TokenBridge.quantize``: ``(indices, dequant)``."""
    st = _patch.data(self)
    scale = st["scale"]
    c = st["token_dim"]
    if logvar is None:
        if x.shape[-1] != 2 * c:
            raise ValueError(
                f"GQ-swapped TokenBridge.quantize needs the posterior: x with 2*C={2 * c} channels "
                f"(normalised mean || logvar, see tokenbridge_gq_inputs) or logvar=, got {tuple(x.shape)}"
            )
        mean_n, logvar = x.chunk(2, dim=-1)
    else:
        mean_n = x
    z_hat, idx = self.gq_quantizer.quantize(mean_n / scale, logvar)
    return idx, z_hat * scale


def dequantize_tokens(self, indices: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, L, C/m)`` -> values in TokenBridge's normalised units ``(B, L, C)``."""
    return self.gq_quantizer.dequant(indices) * _patch.data(self)["scale"]


# TokenBridge's channel-AR modules; detached while the GQ head is in use
TOKENBRIDGE_HEAD = ("condition_proj", "channel_embed", "timesteps_embeddings", "token_embeddings", "channel_blocks",
                    "channel_norm", "channel_final", "channel_heads", "channel_mask")
TABLES = ("reconstruction_values", "boundaries")


def _uses_gq_head(model) -> bool:
    return _patch.data(model)["ar_head"] == "gq"


def _orders(bsz: int, seq_len: int, device, generator=None) -> torch.Tensor:
    """A random generation / masking order per sample (TokenBridge's ``sample_orders``, on any device)."""
    return torch.argsort(torch.rand(bsz, seq_len, generator=generator, device=device), dim=1)


def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Training loss of a swapped TokenBridge: mean negative log-likelihood per GQ code.

    ``imgs``: ``(B, 2C, h, w)`` from :func:`tokenbridge_gq_inputs`. TokenBridge's own masking,
    class embedding and MAE encoder/decoder run unchanged on the GQ-dequantised values; the GQ
    head predicts the ``G`` codes of every masked token.
    """
    x = self.patchify(imgs)
    tokens, values = self.quantize(x.detach())
    class_embedding = self.class_emb(labels)
    orders = _orders(x.shape[0], self.seq_len, x.device)
    mask = self.random_masking(values, orders)
    z = self.forward_mae_decoder(self.forward_mae_encoder(values, mask, class_embedding), mask)
    keep = mask.bool()
    return self.gq_ar_head.loss(z[keep], tokens[keep])


@torch.no_grad()
def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear", labels=None,
                  temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """TokenBridge's iterative masked generation (cosine schedule, classifier-free guidance) with
    the GQ head: returns ``(bsz, C, h, w)`` latents in TokenBridge's normalised units (decode with
    ``vae.decode(latents / 0.2325)``, as TokenBridge does). Tokens of the last call are kept in
    ``model.gq_last_tokens`` ``(bsz, L, G)``."""
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive int, got {num_iter!r}")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    device = self.fake_latent.device
    seq_len, groups = self.seq_len, self.gq_quantizer.num_codebooks
    tokens = torch.zeros(bsz, seq_len, groups, dtype=torch.long, device=device)
    mask = torch.ones(bsz, seq_len, device=device)
    orders = _orders(bsz, seq_len, device, generator)
    cond = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
    uncond = self.fake_latent.repeat(bsz, 1)
    for step in range(num_iter):
        values = dequantize_tokens(self, tokens)
        z = self.forward_mae_decoder(self.forward_mae_encoder(values, mask, cond), mask)
        if cfg != 1.0:
            z_u = self.forward_mae_decoder(self.forward_mae_encoder(values, mask, uncond), mask)
        remaining = int(mask[0].sum())
        mask_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
        to_pred = mask.bool() if step == num_iter - 1 else mask.bool() & ~mask_next.bool()
        feats = z[to_pred]
        if cfg != 1.0:
            w = 1 + (cfg - 1) * (seq_len - mask_len) / seq_len if cfg_schedule == "linear" else cfg
            feats = z_u[to_pred] + w * (feats - z_u[to_pred])
        tokens[to_pred] = self.gq_ar_head.sample(feats, temperature, generator)
        mask = mask_next
        if not bool(mask.any()) and step < num_iter - 1:
            break
    object.__setattr__(self, "gq_last_tokens", tokens)
    return self.unpatchify(dequantize_tokens(self, tokens))


def enable_cache(self) -> None:
    """No-op: the GQ head recomputes its short prefix (TokenBridge's KV cache belongs to its own head)."""


disable_cache = enable_cache


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Never let a checkpoint put TokenBridge's own tables back; say when the GQ head is missing."""
    notes = []
    for name in TABLES:
        key = prefix + name
        if key not in state_dict:
            continue
        current = getattr(module, name, None)
        if current is None:
            state_dict.pop(key)
            notes.append(f"dropped {name} (no scalar table with m > 1)")
        elif state_dict[key].shape != current.shape or not torch.equal(state_dict[key].to(current.device, current.dtype), current):
            state_dict[key] = current.detach().clone()
            notes.append(f"kept the GQ {name} instead of the checkpoint's")
    if _patch.data(module)["ar_head"] == "gq" and not any(k.startswith(prefix + "gq_ar_head.") for k in state_dict):
        notes.append("the checkpoint has no GQ head (gq_ar_head.*): it stays as initialised and must be trained")
    if notes:
        warnings.warn("loading into a GQ-swapped TokenBridge: " + "; ".join(notes), UserWarning, stacklevel=4)


def _head_options(model, head_kwargs: dict) -> dict:
    opts = {}
    proj = getattr(model, "condition_proj", None)
    if isinstance(proj, torch.nn.Linear):
        opts["width"] = proj.out_features
    blocks = getattr(model, "channel_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
        opts["depth"] = len(blocks)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
        if isinstance(heads, int) and opts.get("width", 256) % heads == 0:
            opts["num_heads"] = heads
    opts.update(head_kwargs)
    return opts


def swap_tokenbridge_quantizer(model, gq: GaussianQuantizer | None = None, *, K: int | None = None, m: int = 1,
                               scale: float = TOKENBRIDGE_SCALE, ar_head: str = "auto", head_kwargs: dict | None = None,
                               **gq_kwargs):
    """Replace TokenBridge's quantizer (and, unless kept, its channel-AR head) by GQ in place.

    Swap right after building the model, before wrapping it in DDP or building the optimizer /
    EMA parameter list (the parameters change).

    Args:
        model: a ``TokenBridge`` (``models/tokenbridge.py``) or a model with its interface.
        gq: a ready :class:`~gq_plugin.GaussianQuantizer` over ``C`` channels (sequence layout);
            otherwise one is built from ``K`` (default ``model.quant_levels``), ``m`` and ``gq_kwargs``.
        scale: TokenBridge's latent normaliser (0.2325 for MAR's KL-16 VAE).
        ar_head: ``"gq"`` (a :class:`GroupARHead` over the ``C/m`` K-way codes), ``"tokenbridge"``
            (keep TokenBridge's head: only for ``m = 1`` and ``K = quant_levels``), or ``"auto"``
            (``"tokenbridge"`` when allowed, else ``"gq"``).
        head_kwargs: :class:`GroupARHead` options (``width``, ``depth``, ``num_heads``,
            ``factorize_above``, ...); by default the old head's width / depth / heads.
    """
    if not hasattr(model, "quantize"):
        raise ValueError("not a TokenBridge-like model: no quantize method")
    if ar_head not in ("auto", "gq", "tokenbridge"):
        raise ValueError(f"ar_head must be 'auto', 'gq' or 'tokenbridge', got {ar_head!r}")
    c = _token_dim(model)
    if gq is None:
        K = K if K is not None else int(model.quant_levels)
        _patch.check_codebook_dim(c, m)
        gq = GaussianQuantizer(c, K, m, channel_last=True, **gq_kwargs)
    else:
        if gq_kwargs or K is not None:
            raise ValueError("pass either gq= or K/m/gq_kwargs, not both")
        if gq.dim != c or gq.accept_image_fmap or not gq.channel_last:
            raise ValueError(f"gq must be a sequence-layout GaussianQuantizer(dim={c}, channel_last=True)")
    like_for_like = gq.codebook_dim == 1 and gq.codebook_size == getattr(model, "quant_levels", None)
    if ar_head == "auto":
        ar_head = "tokenbridge" if like_for_like else "gq"
    if ar_head == "tokenbridge" and not like_for_like:
        raise ValueError(f"ar_head='tokenbridge' needs m=1 and K=quant_levels={getattr(model, 'quant_levels', None)}; "
                         f"got m={gq.codebook_dim}, K={gq.codebook_size}: use ar_head='gq'")
    ref = getattr(model, "reconstruction_values", None)
    device = ref.device if isinstance(ref, torch.Tensor) else next(model.parameters()).device
    gq = gq.to(device)
    attrs = {_patch.QUANTIZER_ATTR: gq}
    methods = {"quantize": quantize, "dequantize_tokens": dequantize_tokens}
    if gq.codebook_dim == 1 and isinstance(ref, torch.Tensor):
        table = gq.codebook[:, 0] * scale  # values in normalised units
        std = float(model.std_range)
        lo, hi = float(model.quant_min), float(model.quant_max)
        # inverse of TokenBridge's lookup rescale, so reconstruction_values[tokens] -> rescale == table[tokens]
        attrs["reconstruction_values"] = ((table - lo) / (hi - lo) * (2 * std) - std).to(device, ref.dtype)
    elif ref is not None:
        attrs["reconstruction_values"] = None  # no scalar table: nothing can look tokens up in a stale one
    if ar_head == "gq":
        cond_dim = int(model.mask_token.shape[-1])
        order = getattr(model, "channel_order", None)
        order = order if isinstance(order, torch.Tensor) and order.numel() == gq.num_codebooks else None
        head = GroupARHead(cond_dim, gq.num_codebooks, gq.codebook_size, group_order=order, **_head_options(model, head_kwargs or {}))
        attrs["gq_ar_head"] = head.to(device)
        for name in TOKENBRIDGE_HEAD:
            if hasattr(model, name):
                attrs[name] = None
        methods.update({"forward": forward, "sample_tokens": sample_tokens, "enable_cache": enable_cache, "disable_cache": disable_cache})
    elif head_kwargs:
        raise ValueError("head_kwargs apply to ar_head='gq' only")
    _patch.install(model, "tokenbridge", methods=methods, attrs=attrs,
                   data={"scale": float(scale), "token_dim": c, "ar_head": ar_head})
    handle = model.register_load_state_dict_pre_hook(_load_pre_hook)
    _patch.data(model)["hook_id"] = handle.id
    return model


def unswap_tokenbridge_quantizer(model):
    """Undo :func:`swap_tokenbridge_quantizer` (``quantize``, the channel-AR head, ``forward``,
    ``sample_tokens`` and ``reconstruction_values`` come back); returns the removed quantizer."""
    rec = _patch.record(model)
    if rec is None or rec["host"] != "tokenbridge":
        raise ValueError("model was not swapped by swap_tokenbridge_quantizer")
    model._load_state_dict_pre_hooks.pop(rec["data"].get("hook_id"), None)
    model.__dict__.pop("gq_last_tokens", None)
    return _patch.uninstall(model, "tokenbridge")


def load_tokenbridge_checkpoint(model, checkpoint) -> dict:
    """Load an original TokenBridge checkpoint (``checkpoint-last.pth``'s dict, or its ``"model"`` /
    ``"model_ema"`` state dict) into a swapped model.

    Strict on everything the swap kept (the MAE trunk, class embedding, ...): a missing or
    unexpected trunk key raises ``ValueError``. TokenBridge's tables never replace the GQ table;
    its channel-AR head weights are left out when the GQ head is in use. Returns
    ``{"loaded": [...], "left_out": [...], "untrained": [...]}`` (the last: GQ head keys the
    checkpoint cannot provide).
    """
    rec = _patch.record(model)
    if rec is None or rec["host"] != "tokenbridge":
        raise ValueError("model is not a GQ-swapped TokenBridge: call swap_tokenbridge_quantizer first")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint must be a state dict or TokenBridge's checkpoint dict, got {type(checkpoint).__name__}")
    head_prefixes = tuple(f"{n}." for n in TOKENBRIDGE_HEAD) + TOKENBRIDGE_HEAD if _uses_gq_head(model) else ()
    left_out = [k for k in state if k.startswith(head_prefixes) and k not in model.state_dict()]
    state = {k: v for k, v in state.items() if k not in left_out}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported in the return value instead
        result = model.load_state_dict(state, strict=False)
    ours = (_patch.QUANTIZER_ATTR + ".", "gq_ar_head.")
    missing = [k for k in result.missing_keys if not k.startswith(ours)]
    if missing or result.unexpected_keys:
        raise ValueError(f"not a TokenBridge checkpoint for this model: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    untrained = [k for k in result.missing_keys if k.startswith("gq_ar_head.")]
    if untrained:
        warnings.warn(f"the GQ head ({len(untrained)} tensors) is not in a TokenBridge checkpoint: train it before sampling",
                      UserWarning, stacklevel=2)
    table = "reconstruction_values"  # the pre-hook kept the GQ table (m = 1) or dropped it (m > 1)
    left_out += [table] if table in state else []
    return {"loaded": [k for k in state if k != table], "left_out": left_out, "untrained": untrained}


def gq_post_training_quantize(posterior=None, *, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                              bits: int = 6, m: int = 1, K: int | None = None, quantizer: GaussianQuantizer | None = None,
                              scale: float = TOKENBRIDGE_SCALE, **gq_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """GQ counterpart of TokenBridge's ``post_training_quantize`` (``reconstruction.py``).

    TokenBridge: ``indices, dequant = post_training_quantize(posterior.sample() * 0.2325, bits, -5, 5)``
    then ``vae.decode(dequant / 0.2325)``. Here: ``indices, dequant = gq_post_training_quantize(posterior,
    bits=bits, m=m)`` then the same decode. GQ reads the frozen VAE's posterior ``(B, C, h, w)``
    (mean and log-variance, not a sample); ``K = 2 ** (bits * m)`` by default, so the rate is the
    same ``bits`` per channel as TokenBridge's. Returns ``indices (B, h, w, C/m)`` int64 and
    ``dequant (B, C, h, w)`` in TokenBridge's normalised units (``codebook[indices] * scale``).
    """
    if posterior is not None:
        mean, logvar = posterior.mean, posterior.logvar
    if not isinstance(mean, torch.Tensor) or not isinstance(logvar, torch.Tensor) or mean.ndim != 4 or mean.shape != logvar.shape:
        raise ValueError("pass a posterior (with .mean/.logvar) or mean= and logvar= shaped (B, C, h, w)")
    if quantizer is None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be a positive int, got {bits!r}")
        _patch.check_codebook_dim(mean.shape[1], m)
        K = K if K is not None else 2 ** (bits * m)
        if K > 2**24:
            raise ValueError(f"K = 2**(bits*m) = {K} is too large for a search; pass a smaller m or K")
        quantizer = GaussianQuantizer(mean.shape[1], K, m, accept_image_fmap=True, **gq_kwargs).to(mean.device)
    elif not quantizer.accept_image_fmap or quantizer.dim != mean.shape[1]:
        raise ValueError(f"quantizer must be a GaussianQuantizer(dim={mean.shape[1]}, accept_image_fmap=True)")
    z_hat, indices = quantizer.quantize(mean, logvar)
    return indices, z_hat * scale
