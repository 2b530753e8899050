"""A small model with TokenBridge's published interface (YuqingWang1029/TokenBridge @ 3ede281,
``models/tokenbridge.py``), written for the tests: the attribute and method names, shapes and
semantics the GQ swap touches, with tiny MLPs in place of the transformers. Not TokenBridge's code.

``forward(imgs, labels)`` follows TokenBridge's training step (quantize -> reorder channels by
``channel_order`` -> random mask -> MAE encoder / decoder -> channel-AR logits -> cross-entropy);
``sample_tokens`` its generation (reconstruction-table lookups, cosine mask schedule).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gq_plugin.lab.baselines.tokenbridge import tokenbridge_tables


class TokenBridgeMini(nn.Module):
    def __init__(self, img_size=4, vae_stride=1, patch_size=1, vae_embed_dim=16, quant_levels=64, embed_dim=32,
                 channel_embed_dim=16, buffer_size=2, class_num=10, quant_min=-5.0, quant_max=5.0, std_range=3.0):
        super().__init__()
        self.quant_levels, self.vae_embed_dim = quant_levels, vae_embed_dim
        self.quant_min, self.quant_max, self.std_range = quant_min, quant_max, std_range
        self.channel_order = torch.tensor([8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5])[:vae_embed_dim]
        if vae_embed_dim != 16:
            self.channel_order = torch.randperm(vae_embed_dim, generator=torch.Generator().manual_seed(0))
        self.inv_channel_order = torch.argsort(self.channel_order)
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.buffer_size = buffer_size
        self.class_emb = nn.Embedding(class_num, embed_dim)
        self.fake_latent = nn.Parameter(torch.randn(1, embed_dim) * 0.02)
        self.z_proj = nn.Linear(self.token_embed_dim, embed_dim)
        self.encoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.seq_len + buffer_size, embed_dim) * 0.02)
        self.encoder_blocks = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.decoder_embed = nn.Linear(embed_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_blocks = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.output_pos_embed = nn.Parameter(torch.randn(1, self.seq_len, embed_dim) * 0.02)
        # channel AR head (names as TokenBridge's)
        self.condition_proj = nn.Linear(embed_dim, channel_embed_dim)
        self.channel_embed = nn.Parameter(torch.zeros(1, vae_embed_dim, channel_embed_dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, vae_embed_dim, channel_embed_dim))
        self.token_embeddings = nn.ModuleList([nn.Embedding(quant_levels, channel_embed_dim) for _ in range(vae_embed_dim - 1)])
        self.channel_blocks = nn.ModuleList([nn.Linear(channel_embed_dim, channel_embed_dim)])
        self.channel_norm = nn.LayerNorm(channel_embed_dim)
        self.channel_final = nn.Linear(channel_embed_dim, channel_embed_dim)
        self.channel_heads = nn.ModuleList([nn.Linear(channel_embed_dim, quant_levels) for _ in range(vae_embed_dim)])
        self.register_buffer("channel_mask", torch.triu(torch.full((vae_embed_dim, vae_embed_dim), float("-inf")), 1))
        edges, centres = tokenbridge_tables(int(math.log2(quant_levels)), std_range)
        self.register_buffer("reconstruction_values", centres.float())
        self.register_buffer("boundaries", edges.float())

    def quantize(self, x):
        xn = ((x - self.quant_min) / (self.quant_max - self.quant_min) * (2 * self.std_range) - self.std_range).clamp(-self.std_range, self.std_range)
        indices = (xn.unsqueeze(-1) - self.reconstruction_values).abs().argmin(-1)
        return indices, self._values()[indices]

    def _values(self):
        return (self.reconstruction_values + self.std_range) / (2 * self.std_range) * (self.quant_max - self.quant_min) + self.quant_min

    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x):
        b, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    def random_masking(self, x, orders):
        n = math.ceil(self.seq_len * 0.75)
        mask = torch.zeros(x.shape[0], self.seq_len, device=x.device)
        return mask.scatter(1, orders[:, :n], torch.ones_like(mask))

    def forward_mae_encoder(self, x, mask, class_embedding):
        x = self.z_proj(x)
        b, _, d = x.shape
        x = torch.cat([class_embedding[:, None].expand(b, self.buffer_size, d), x], 1) + self.encoder_pos_embed_learned
        keep = torch.cat([torch.ones(b, self.buffer_size, device=x.device), 1 - mask], 1).bool()
        return self.encoder_blocks(x[keep].reshape(b, -1, d))  # masked tokens dropped, as TokenBridge

    def forward_mae_decoder(self, x, mask):
        x = self.decoder_embed(x)
        b, d = x.shape[0], x.shape[-1]
        keep = torch.cat([torch.ones(b, self.buffer_size, device=x.device), 1 - mask], 1).bool()
        full = self.mask_token.expand(b, keep.shape[1], d).clone()
        full[keep] = x.reshape(-1, d)
        return self.decoder_blocks(full)[:, self.buffer_size:] + self.output_pos_embed

    def _channel_logits(self, z, prev):
        c = self.condition_proj(z)
        seq = [c] + [self.token_embeddings[i](prev[:, i]) for i in range(prev.shape[1])]
        x = torch.stack(seq, 1) + self.channel_embed[:, : len(seq)] + self.timesteps_embeddings[:, : len(seq)]
        x = self.channel_final(self.channel_norm(self.channel_blocks[0](x).cumsum(1)))
        return torch.stack([self.channel_heads[i](x[:, i]) for i in range(x.shape[1])], 1)

    def forward(self, imgs, labels):
        x = self.patchify(imgs)
        quant_indices, quant_values = self.quantize(x.clone().detach())
        gt_tokens = quant_indices[..., self.channel_order]
        orders = torch.argsort(torch.rand(x.shape[0], self.seq_len), 1)
        mask = self.random_masking(quant_values, orders)
        z = self.forward_mae_decoder(self.forward_mae_encoder(quant_values, mask, self.class_emb(labels)), mask)
        m = mask.bool()
        logits = self._channel_logits(z[m], gt_tokens[m][:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.quant_levels), gt_tokens[m].reshape(-1))

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=4, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0):
        tokens = torch.zeros(bsz, self.seq_len, self.vae_embed_dim, dtype=torch.long)
        mask = torch.ones(bsz, self.seq_len)
        orders = torch.argsort(torch.rand(bsz, self.seq_len), 1)
        cond = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
        for step in range(num_iter):
            values = self.lookup(tokens)
            z = self.forward_mae_decoder(self.forward_mae_encoder(values, mask, cond), mask)
            mask_len = max(1, min(int(mask[0].sum()) - 1, math.floor(self.seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
            mask_next = torch.zeros_like(mask).scatter(1, orders[:, :mask_len], 1.0)
            to_pred = mask.bool() if step == num_iter - 1 else mask.bool() & ~mask_next.bool()
            feats, prev = z[to_pred], torch.zeros(int(to_pred.sum()), 0, dtype=torch.long)
            for i in range(self.vae_embed_dim):
                logits = self._channel_logits(feats, prev)[:, -1]
                prev = torch.cat([prev, torch.multinomial(F.softmax(logits / temperature, -1), 1)], 1)
            tokens[to_pred] = prev[..., self.inv_channel_order]
            mask = mask_next
        return self.unpatchify(self.lookup(tokens))

    def lookup(self, tokens):
        """The reconstruction lookup of TokenBridge.sample_tokens."""
        cur = self.reconstruction_values[tokens]
        return (cur + self.std_range) / (2 * self.std_range) * (self.quant_max - self.quant_min) + self.quant_min
