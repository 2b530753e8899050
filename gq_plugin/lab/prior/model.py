"""The prior network: x-transformers' ``TransformerWrapper`` (a causal ``Decoder``, rotary positions)
inside its ``AutoregressiveWrapper`` -- no hand-written GPT."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import TokenLayout


def _x_transformers():
    try:
        import x_transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("gq prior needs x-transformers: pip install 'gq-plugin[prior]'") from e
    return x_transformers


def build_prior(layout: TokenLayout, model_cfg) -> torch.nn.Module:
    """``AutoregressiveWrapper(TransformerWrapper(Decoder(...)))`` over ``layout``'s sequences:
    ``K + 1`` input tokens (the codes and the BOS), ``K`` logits, ``1 + G*h*w`` positions."""
    xt = _x_transformers()
    dim_head = int(model_cfg["dim_head"])
    net = xt.TransformerWrapper(
        num_tokens=layout.codebook_size + 1,
        logits_dim=layout.codebook_size,
        max_seq_len=layout.num_tokens + 1,
        use_abs_pos_emb=False,
        attn_layers=xt.Decoder(dim=int(model_cfg["dim"]), depth=int(model_cfg["depth"]), heads=int(model_cfg["heads"]),
                               attn_dim_head=dim_head, rotary_pos_emb=True,
                               # x-transformers rotates dim_head // 2 dims by default and asks for >= 32 in language models
                               rotary_emb_dim=min(dim_head, max(32, dim_head // 2)),
                               attn_dropout=float(model_cfg["dropout"]), ff_dropout=float(model_cfg["dropout"])),
    )
    return xt.AutoregressiveWrapper(net)


def sequence_nll(prior: torch.nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in **bits** of every sequence ``(B, 1 + L)`` (BOS first): ``(B,)``,
    the sum over its ``L`` tokens of ``-log2 p(token | earlier tokens)``."""
    net = prior.net if hasattr(prior, "net") else prior
    logits = net(seq[:, :-1])
    ce = F.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none")
    return ce.sum(1) / math.log(2)
