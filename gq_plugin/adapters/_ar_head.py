"""An autoregressive head over the ``G`` K-way GQ codes of one token (for TokenBridge-style models).

TokenBridge predicts a token's 16 per-channel codes (64 levels each) one after the other with a
small causal transformer conditioned on the MAR decoder's feature of that token. With GQ a
token carries ``G = C / m`` codes over a ``K``-entry codebook; :class:`GroupARHead` predicts them
autoregressively across the groups of the token:

    p(k_1..k_G | c) = prod_g p(k_g | c, k_1..k_{g-1})

* input sequence: ``[cond, e(k_1), ..., e(k_{G-1})]`` + group position embeddings, the condition
  added at every position; causal self-attention blocks; position ``g`` predicts ``k_{g+1}``;
* **factorised output layer** for large ``K`` (``K > factorize_above``): ``k = hi * K_lo + lo`` with
  ``K_lo = 2**ceil(log2(K) / 2)``; the head predicts ``hi`` (``K_hi`` classes), then ``lo`` given
  ``hi`` (``K_lo`` classes). ``-log p(k) = -log p(hi) - log p(lo | hi)`` exactly (chain rule), with
  ``O(sqrt K)`` output and embedding parameters instead of ``O(K)``; code embeddings are
  ``e_hi(hi) + e_lo(lo)``. Codes ``>= K`` that a non-power-of-two ``K`` would allow are masked.
* ``group_order``: the order in which groups are predicted (TokenBridge uses a frequency order
  for its 16 channels); tokens go in and come out in the natural group order.

``nll(cond, tokens)`` gives the per-group negative log-likelihood (nats) for training;
``sample(cond, temperature)`` draws tokens (``temperature=0``: greedy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupARHead(nn.Module):
    """Autoregressive predictor of ``G`` codes in ``[0, K)`` per token, conditioned on a feature.

    Args:
        cond_dim: channels of the conditioning feature (the MAR decoder's output).
        num_groups: G, codes per token.
        codebook_size: K.
        width / depth / num_heads / mlp_ratio / dropout: the causal transformer.
        factorize_above: use the two-level output layer when ``K`` exceeds this.
        group_order: a permutation of ``range(G)``: the prediction order.
    """

    def __init__(self, cond_dim: int, num_groups: int, codebook_size: int, *, width: int = 256, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, factorize_above: int = 4096,
                 group_order=None) -> None:
        super().__init__()
        for name, v in (("cond_dim", cond_dim), ("num_groups", num_groups), ("width", width), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size must be an int >= 2, got {codebook_size!r}")
        if width % num_heads:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}")
        order = torch.arange(num_groups) if group_order is None else torch.as_tensor(group_order, dtype=torch.long).reshape(-1)
        if order.numel() != num_groups or not torch.equal(order.sort().values, torch.arange(num_groups)):
            raise ValueError(f"group_order must be a permutation of range({num_groups}), got {order.tolist()}")
        self.num_groups, self.codebook_size, self.width = num_groups, codebook_size, width
        self.register_buffer("group_order", order, persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)
        self.factorized = codebook_size > factorize_above
        self.cond_proj = nn.Linear(cond_dim, width)
        self.pos = nn.Parameter(torch.randn(1, num_groups, width) * 0.02)
        if self.factorized:
            self.k_lo = 2 ** math.ceil(math.log2(codebook_size) / 2)
            self.k_hi = -(-codebook_size // self.k_lo)
            self.embed_hi = nn.Embedding(self.k_hi, width)
            self.embed_lo = nn.Embedding(self.k_lo, width)
            self.out_hi = nn.Linear(width, self.k_hi)
            self.given_hi = nn.Embedding(self.k_hi, width)
            self.norm_lo = nn.LayerNorm(width)
            self.out_lo = nn.Linear(width, self.k_lo)
        else:
            self.embed = nn.Embedding(codebook_size, width)
            self.out = nn.Linear(width, codebook_size)
        layer = nn.TransformerEncoderLayer(width, num_heads, int(width * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        mask = torch.triu(torch.full((num_groups, num_groups), float("-inf")), 1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def extra_repr(self) -> str:
        f = f", factorized={self.k_hi}x{self.k_lo}" if self.factorized else ""
        return f"num_groups={self.num_groups}, codebook_size={self.codebook_size}, width={self.width}{f}"

    # ------------------------------------------------------------------ pieces

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        if self.factorized:
            return self.embed_hi(codes // self.k_lo) + self.embed_lo(codes % self.k_lo)
        return self.embed(codes)

    def _hidden(self, cond: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """cond (N, D), prev (N, j) codes in prediction order -> hidden states (N, j + 1, width)."""
        c = self.cond_proj(cond)
        seq = c[:, None]
        if prev.shape[1]:
            seq = torch.cat([seq, self._embed(prev)], 1)
        n = seq.shape[1]
        x = seq + self.pos[:, :n] + c[:, None]
        return self.norm(self.blocks(x, mask=self.causal_mask[:n, :n], is_causal=True))

    def _lo_logits(self, h: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        logits = self.out_lo(self.norm_lo(h + self.given_hi(hi)))
        valid = self.codebook_size - hi * self.k_lo  # codes >= K are impossible
        lo = torch.arange(self.k_lo, device=h.device)
        return logits.masked_fill(lo >= valid[..., None], float("-inf"))

    def _check(self, cond: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[1] != self.cond_proj.in_features:
            raise ValueError(f"cond must be (N, {self.cond_proj.in_features}), got {getattr(cond, 'shape', type(cond).__name__)}")
        if tokens is not None:
            if tokens.shape != (cond.shape[0], self.num_groups):
                raise ValueError(f"tokens must be ({cond.shape[0]}, {self.num_groups}), got {tuple(tokens.shape)}")
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
                raise ValueError(f"tokens must lie in [0, {self.codebook_size})")

    # ------------------------------------------------------------------ public

    def nll(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-group negative log-likelihood in nats, ``(N, G)`` in the natural group order."""
        self._check(cond, tokens)
        t = tokens.long()[:, self.group_order]
        h = self._hidden(cond, t[:, :-1])  # (N, G, width): position g predicts group g
        if self.factorized:
            hi, lo = t // self.k_lo, t % self.k_lo
            nll = F.cross_entropy(self.out_hi(h).transpose(1, 2), hi, reduction="none")
            nll = nll + F.cross_entropy(self._lo_logits(h, hi).transpose(1, 2), lo, reduction="none")
        else:
            nll = F.cross_entropy(self.out(h).transpose(1, 2), t, reduction="none")
        return nll[:, self.inverse_order]

    def loss(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per code (TokenBridge's cross-entropy over channels)."""
        return self.nll(cond, tokens).mean()

    forward = loss

    @staticmethod
    def _draw(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        probs = F.softmax(logits.float() / temperature, -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(N, G)`` codes group by group (``temperature=0``: the most likely code each step)."""
        self._check(cond)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        prev = torch.zeros(cond.shape[0], 0, dtype=torch.long, device=cond.device)
        for _ in range(self.num_groups):
            h = self._hidden(cond, prev)[:, -1]
            if self.factorized:
                hi = self._draw(self.out_hi(h), temperature, generator)
                code = hi * self.k_lo + self._draw(self._lo_logits(h, hi), temperature, generator)
            else:
                code = self._draw(self.out(h), temperature, generator)
            prev = torch.cat([prev, code[:, None]], 1)
        return prev[:, self.inverse_order]
