"""Minimal models written to the *published interfaces* of libraries that cannot be pip-installed
(CompVis ldm) or whose model modules need pytorch-lightning/torchvision (taming.models).

Each mirrors the call structure of the original class (methods, attribute names, return values);
the networks are tiny convolutions.
"""

import numpy as np
import torch
from torch import nn


class LdmDiagonalGaussianDistribution:
    """ldm/modules/distributions/distributions.py: DiagonalGaussianDistribution."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self):
        return self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)

    def kl(self, other=None):
        return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims))

    def mode(self):
        return self.mean


class LdmAutoencoderKL(nn.Module):
    """ldm/models/autoencoder.py: AutoencoderKL (without the Lightning / loss parts)."""

    def __init__(self, z_channels=4, embed_dim=4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 2 * z_channels, 3, 2, 1))  # double_z
        self.decoder = nn.Sequential(nn.ConvTranspose2d(z_channels, 16, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(16, 3, 4, 2, 1))
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim

    def encode(self, x):
        h = self.encoder(x)
        moments = self.quant_conv(h)
        return LdmDiagonalGaussianDistribution(moments)

    def decode(self, z):
        z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        dec = self.decode(z)
        return dec, posterior

    def get_last_layer(self):
        return self.decoder[-1].weight


def ldm_kl_term(posteriors):
    """How ldm.modules.losses.LPIPSWithDiscriminator reduces the KL."""
    kl_loss = posteriors.kl()
    return torch.sum(kl_loss) / kl_loss.shape[0]


class TamingVQModel(nn.Module):
    """taming/models/vqgan.py: VQModel's encode/decode/forward/decode_code structure."""

    def __init__(self, quantize, z_channels=8, embed_dim=8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, z_channels, 3, 2, 1))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(z_channels, 16, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(16, 3, 4, 2, 1))
        self.quantize = quantize
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        h = self.encoder(x)
        h = self.quant_conv(h)
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info

    def decode(self, quant):
        quant = self.post_quant_conv(quant)
        return self.decoder(quant)

    def decode_code(self, code_b):
        quant_b = self.quantize.embed_code(code_b)
        return self.decode(quant_b)

    def forward(self, input):
        quant, diff, _ = self.encode(input)
        dec = self.decode(quant)
        return dec, diff


class StandinVectorQuantizer2(nn.Module):
    """Used only when taming is not importable: taming's VectorQuantizer2 call contract."""

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.sane_index_shape = n_e, e_dim, beta, sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        zz = z.permute(0, 2, 3, 1).contiguous()
        flat = zz.view(-1, self.e_dim)
        idx = torch.cdist(flat, self.embedding.weight).argmin(1)
        z_q = self.embedding(idx).view(zz.shape)
        loss = torch.mean((z_q.detach() - zz) ** 2) + self.beta * torch.mean((z_q - zz.detach()) ** 2)
        z_q = (zz + (z_q - zz).detach()).permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices, shape):
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


def taming_vector_quantizer2():
    """(class, source) -- taming's real VectorQuantizer2 when importable."""
    try:
        from taming.modules.vqvae.quantize import VectorQuantizer2

        return VectorQuantizer2, "taming"
    except Exception:
        return StandinVectorQuantizer2, "standin"


class TokenBridgeStandin(nn.Module):
    """The attributes/methods of TokenBridge (models/tokenbridge.py) the quantizer touches."""

    def __init__(self, vae_embed_dim=16, quant_levels=64, quant_min=-5.0, quant_max=5.0, std_range=3.0, patch_size=1):
        super().__init__()
        from gq_plugin.lab.baselines.tokenbridge import tokenbridge_tables

        self.vae_embed_dim = vae_embed_dim
        self.patch_size = patch_size
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.quant_levels, self.quant_min, self.quant_max, self.std_range = quant_levels, quant_min, quant_max, std_range
        self.channel_order = torch.tensor([8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5])
        edges, centres = tokenbridge_tables(int(np.log2(quant_levels)), std_range)
        self.register_buffer("reconstruction_values", centres.float())
        self.register_buffer("boundaries", edges.float())
        self.head = nn.Linear(4, 4)  # has parameters, like the real model

    def quantize(self, x):
        x_normalized = (x - self.quant_min) / (self.quant_max - self.quant_min) * (2 * self.std_range) - self.std_range
        x_clamped = x_normalized.clamp(-self.std_range, self.std_range)
        dists = (x_clamped.unsqueeze(-1) - self.reconstruction_values).abs()
        indices = dists.argmin(dim=-1)
        values = (self.reconstruction_values + self.std_range) / (2 * self.std_range) * (self.quant_max - self.quant_min) + self.quant_min
        return indices, values[indices]

    def patchify(self, x):
        bsz, c, h, w = x.shape
        p = self.patch_size
        h_, w_ = h // p, w // p
        x = x.reshape(bsz, c, h_, p, w_, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(bsz, h_ * w_, c * p**2)

    def training_targets(self, imgs):
        """The first lines of TokenBridge.forward."""
        x = self.patchify(imgs)
        gt_latents = x.clone().detach()
        quant_indices, quant_values = self.quantize(gt_latents)
        gt_tokens = quant_indices[..., self.channel_order]
        return quant_values, gt_tokens

    def lookup(self, tokens):
        """The reconstruction lookup of TokenBridge.sample_tokens."""
        cur_values = self.reconstruction_values[tokens]
        return (cur_values + self.std_range) / (2 * self.std_range) * (self.quant_max - self.quant_min) + self.quant_min
