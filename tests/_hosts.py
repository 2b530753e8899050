"""Host code for the ldm / taming / sgm adapter tests.

Real classes wherever pip installs them (scripts/setup.sh):

* ``ldm``: stable-diffusion-sdkit 2.1.5 (Stability's ``ldm`` package): ``AutoencoderKL``,
  ``DiagonalGaussianDistribution``, ``LatentDiffusion``;
* ``taming``: taming-transformers-rom1504 0.0.6: ``VQModel``, ``NLayerDiscriminator``,
  ``hinge_d_loss``, ``adopt_weight``;
* pytorch-lightning 1.9.5: the real ``Trainer`` runs the hosts' own ``training_step``.

Two gaps are filled by code written here to the hosts' published contracts (no upstream code is
copied):

* the losses: ldm's ``LPIPSWithDiscriminator`` is not in the pip package and taming's
  ``VQLPIPSWithDiscriminator`` builds a torchvision VGG with downloaded weights, so
  :class:`LdmLoss` / :class:`TamingLoss` reproduce their ``forward`` contracts (kl / codebook
  term, adaptive GAN weight, hinge discriminator loss; perceptual term omitted) around taming's
  real discriminator;
* sgm (Stability-AI/generative-models, not on PyPI): :class:`SgmEngine`, :class:`SgmLoss` and
  :func:`sgm_integer_roundtrip` reproduce ``AutoencodingEngine`` (manual optimisation,
  ``training_step``), ``GeneralLPIPSWithDiscriminator`` (``regularization_weights``,
  ``forward_keys``) and ``AEIntegerWrapper`` as of upstream commit
  ``0ad7de9a5cb53fd63d6d30a4f385485e72e08597`` (2025-05-20).

Some host modules import torchvision at module level for image-grid logging or LPIPS only
(``ldm.models.diffusion.ddpm``, ``taming.main``, ``taming.modules.losses.lpips``).
:func:`import_host` imports them with a placeholder ``torchvision`` that exists only while the
import runs and raises if any of its functions is called.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

SGM_COMMIT = "0ad7de9a5cb53fd63d6d30a4f385485e72e08597"
_PLACEHOLDERS = ("torchvision", "torchvision.utils", "torchvision.models")


def import_host(name: str):
    """``importlib.import_module(name)`` for a host module whose import chain touches torchvision."""
    if name in sys.modules or "torchvision" in sys.modules:
        return importlib.import_module(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision is not installed (placeholder used only to import {name})")

    tv = types.ModuleType("torchvision")
    tv.utils = types.ModuleType("torchvision.utils")
    tv.models = types.ModuleType("torchvision.models")
    tv.utils.make_grid = tv.utils.save_image = tv.models.vgg16 = unavailable
    sys.modules.update({"torchvision": tv, "torchvision.utils": tv.utils, "torchvision.models": tv.models})
    try:
        return importlib.import_module(name)
    finally:
        for key in _PLACEHOLDERS:
            sys.modules.pop(key, None)


# ----------------------------------------------------------------------------------- models

LDM_DDCONFIG = dict(double_z=True, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TAMING_DDCONFIG = dict(double_z=False, z_channels=8, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                       num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _module_config(cls, **params) -> dict:
    return {"target": f"{cls.__module__}.{cls.__qualname__}", "params": params}


def ldm_autoencoder(kl_weight: float = 1e-6, disc_start: int = 0, embed_dim: int = 4, lr: float = 1e-3, **kwargs):
    """The real ``ldm.models.autoencoder.AutoencoderKL`` (tiny), with :class:`LdmLoss`."""
    from ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(LDM_DDCONFIG, _module_config(LdmLoss, disc_start=disc_start, kl_weight=kl_weight), embed_dim, **kwargs)
    model.learning_rate = lr
    return model


def taming_vqmodel(n_embed: int = 64, embed_dim: int = 8, codebook_weight: float = 1.0, disc_start: int = 0, lr: float = 1e-3,
                   **kwargs):
    """The real ``taming.models.vqgan.VQModel`` (tiny), with :class:`TamingLoss`."""
    VQModel = import_host("taming.models.vqgan").VQModel
    model = VQModel(TAMING_DDCONFIG, _module_config(TamingLoss, disc_start=disc_start, codebook_weight=codebook_weight),
                    n_embed, embed_dim, **kwargs)
    model.learning_rate = lr
    return model


def _discriminator():
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    return NLayerDiscriminator(input_nc=3, n_layers=1, ndf=16).apply(weights_init)


def _gan_helpers():
    """taming's ``adopt_weight`` and ``hinge_d_loss`` (their module imports LPIPS -> torchvision)."""
    vqp = import_host("taming.modules.losses.vqperceptual")
    return vqp.adopt_weight, vqp.hinge_d_loss


def _adaptive_weight(nll_loss, g_loss, last_layer, scale):
    """taming / ldm: ||grad nll|| / ||grad g|| at the decoder's last layer (clamped, detached)."""
    try:
        g1 = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    except RuntimeError:  # no graph (validation)
        return torch.tensor(0.0)
    return (g1.norm() / (g2.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


class LdmLoss(nn.Module):
    """``ldm.modules.losses.LPIPSWithDiscriminator``'s contract (CompVis latent-diffusion a506df5):
    attribute ``kl_weight``; ``forward(inputs, reconstructions, posteriors, optimizer_idx,
    global_step, last_layer=None, cond=None, split="train", weights=None)``; ``posteriors.kl()``
    is evaluated on **both** passes and enters the autoencoder loss as
    ``kl_weight * sum(kl) / B``. L1 reconstruction, learned scalar ``logvar``; no LPIPS."""

    def __init__(self, disc_start=0, logvar_init=0.0, kl_weight=1.0, disc_factor=1.0, disc_weight=1.0):
        super().__init__()
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = _discriminator()
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None, cond=None,
                split="train", weights=None):
        adopt_weight, hinge_d_loss = _gan_helpers()

        rec = (inputs - reconstructions).abs()
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll = nll.sum() / nll.shape[0]
        kl = posteriors.kl()
        kl = kl.sum() / kl.shape[0]
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = _adaptive_weight(nll, g_loss, last_layer, self.discriminator_weight)
            loss = nll + self.kl_weight * kl + d_weight * disc_factor * g_loss
            return loss, {f"{split}/kl_loss": kl.detach(), f"{split}/total_loss": loss.detach()}
        d_loss = disc_factor * hinge_d_loss(self.discriminator(inputs.detach()), self.discriminator(reconstructions.detach()))
        return d_loss, {f"{split}/disc_loss": d_loss.detach()}


class TamingLoss(nn.Module):
    """``taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator``'s contract: attribute
    ``codebook_weight``; ``forward(codebook_loss, inputs, reconstructions, optimizer_idx,
    global_step, last_layer=None, cond=None, split="train")``; the autoencoder loss is
    ``mean L1 + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss.mean()``."""

    def __init__(self, disc_start=0, codebook_weight=1.0, disc_factor=1.0, disc_weight=1.0):
        super().__init__()
        self.codebook_weight = codebook_weight
        self.discriminator = _discriminator()
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None, cond=None,
                split="train"):
        adopt_weight, hinge_d_loss = _gan_helpers()

        nll = (inputs - reconstructions).abs().mean()
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = _adaptive_weight(nll, g_loss, last_layer, self.discriminator_weight)
            loss = nll + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
            return loss, {f"{split}/quant_loss": codebook_loss.detach().mean(), f"{split}/total_loss": loss.detach()}
        d_loss = disc_factor * hinge_d_loss(self.discriminator(inputs.detach()), self.discriminator(reconstructions.detach()))
        return d_loss, {f"{split}/disc_loss": d_loss.detach()}


# ----------------------------------------------------------------------------------- sgm contract

class SgmLoss(nn.Module):
    """``sgm.modules.autoencoding.losses.GeneralLPIPSWithDiscriminator``'s contract: keyword
    ``regularization_log``; ``forward_keys``; every key ``k`` of the regularizer's log that is in
    ``regularization_weights`` adds ``regularization_weights[k] * log[k]`` to the autoencoder
    loss; ``get_trainable_parameters()`` = the discriminator's. L1 reconstruction, no LPIPS."""

    forward_keys = ["optimizer_idx", "global_step", "last_layer", "split", "regularization_log"]

    def __init__(self, disc_start=0, regularization_weights=None, disc_weight=1.0):
        super().__init__()
        self.discriminator = _discriminator()
        self.discriminator_iter_start = disc_start
        self.discriminator_weight = disc_weight
        self.regularization_weights = dict(regularization_weights or {})

    def get_trainable_parameters(self):
        return self.discriminator.parameters()

    def get_trainable_autoencoder_parameters(self):
        yield from ()

    def forward(self, inputs, reconstructions, *, regularization_log, optimizer_idx, global_step, last_layer, split="train"):
        _, hinge_d_loss = _gan_helpers()

        rec = (inputs - reconstructions).abs()
        nll = rec.sum() / rec.shape[0]
        if optimizer_idx == 0:
            if global_step >= self.discriminator_iter_start:
                g_loss = -self.discriminator(reconstructions).mean()
                d_weight = _adaptive_weight(nll, g_loss, last_layer, self.discriminator_weight)
            else:
                g_loss, d_weight = torch.zeros((), requires_grad=True), torch.tensor(0.0)
            loss = nll + d_weight * g_loss
            for k, v in regularization_log.items():
                if k in self.regularization_weights:
                    loss = loss + self.regularization_weights[k] * v
            return loss, {f"{split}/loss/total": loss.detach()}
        d_loss = hinge_d_loss(self.discriminator(inputs.detach()), self.discriminator(reconstructions.detach()))
        if global_step < self.discriminator_iter_start:
            d_loss = d_loss * 0.0
        return d_loss, {f"{split}/loss/disc": d_loss.detach()}


class SgmEngine(pl.LightningModule):
    """``sgm.models.autoencoder.AutoencodingEngine``'s contract: children ``encoder``, ``decoder``,
    ``loss``, ``regularization``; ``encode(x, return_reg_log=False, unregularized=False)``;
    ``forward -> (z, dec, reg_log)``; manual optimisation where each ``training_step`` trains one
    optimizer, ``batch_idx % len(optimizers)`` (the autoencoder's until ``disc_start_iter``),
    inside ``opt.toggle_model()``; the autoencoder optimizer holds the loss's and the
    regularizer's trainable parameters plus encoder and decoder."""

    def __init__(self, regularization: nn.Module, loss: nn.Module, z_channels: int = 4, double_z: bool = True,
                 disc_start_iter: int = 0, lr: float = 1e-3):
        super().__init__()
        self.automatic_optimization = False
        from ldm.modules.diffusionmodules.model import (  # the same Encoder/Decoder sgm ships
            Decoder,
            Encoder,
        )

        cfg = dict(LDM_DDCONFIG, z_channels=z_channels, double_z=double_z)
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        self.loss = loss
        self.regularization = regularization
        self.disc_start_iter = disc_start_iter
        self.learning_rate = lr

    def get_input(self, batch):
        return batch["jpg"]

    def encode(self, x, return_reg_log=False, unregularized=False):
        z = self.encoder(x)
        if unregularized:
            return z, {}
        z, reg_log = self.regularization(z)
        return (z, reg_log) if return_reg_log else z

    def decode(self, z, **kwargs):
        return self.decoder(z, **kwargs)

    def forward(self, x):
        z, reg_log = self.encode(x, return_reg_log=True)
        return z, self.decode(z), reg_log

    def get_last_layer(self):
        return self.decoder.conv_out.weight

    def inner_training_step(self, batch, batch_idx, optimizer_idx=0):
        x = self.get_input(batch)
        z, xrec, reg_log = self(x)
        info = {"z": z, "optimizer_idx": optimizer_idx, "global_step": self.global_step, "last_layer": self.get_last_layer(),
                "split": "train", "regularization_log": reg_log, "autoencoder": self}
        loss, _ = self.loss(x, xrec, **{k: info[k] for k in self.loss.forward_keys})
        return loss

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        optimizer_idx = 0 if self.global_step < self.disc_start_iter else batch_idx % len(opts)
        opt = opts[optimizer_idx]
        opt.zero_grad()
        with opt.toggle_model():
            loss = self.inner_training_step(batch, batch_idx, optimizer_idx)
            self.manual_backward(loss)
        opt.step()

    def get_autoencoder_params(self):
        params = list(self.loss.get_trainable_autoencoder_parameters())
        params += list(self.regularization.get_trainable_parameters())
        return params + list(self.encoder.parameters()) + list(self.decoder.parameters())

    def configure_optimizers(self):
        opt_ae = torch.optim.Adam(self.get_autoencoder_params(), lr=self.learning_rate)
        opt_disc = torch.optim.Adam(list(self.loss.get_trainable_parameters()), lr=self.learning_rate)
        return [opt_ae, opt_disc]


def sgm_integer_roundtrip(model, x, shape):
    """``sgm.models.autoencoder.AEIntegerWrapper(model, shape).encode(x)`` then ``.decode(inds)``:
    the flattened ``reg_log["min_encoding_indices"]`` and the decoded image."""
    _, log = model.encode(x, return_reg_log=True)
    inds = rearrange(log["min_encoding_indices"], "b ... -> b (...)")
    grid = rearrange(inds, "b (h w) -> b h w", h=shape[0], w=shape[1]) if shape is not None else inds
    h = rearrange(model.regularization.get_codebook_entry(grid), "b h w c -> b c h w")
    return inds, model.decode(h)


# ----------------------------------------------------------------------------------- Lightning runs

class _ImageData(torch.utils.data.Dataset):
    def __init__(self, n: int, key: str, channel_last: bool, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, size, size, 3, generator=g) * 2 - 1
        self.key, self.channel_last = key, channel_last

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return {self.key: img if self.channel_last else img.permute(2, 0, 1).contiguous()}


class StepLog(pl.Callback):
    """Records, before every optimizer step, ``(optimizer index, TDC num_steps)``."""

    def __init__(self, tdc) -> None:
        self.tdc = tdc
        self.events: list[tuple[int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer, opt_idx=0):
        self.events.append((int(opt_idx), int(self.tdc.num_steps)))


def fit(model, tdc, batches: int, key: str = "image", channel_last: bool = True, batch_size: int = 2):
    """Run the real Lightning ``Trainer`` over ``batches`` batches; returns the :class:`StepLog`."""
    log = StepLog(tdc)
    data = torch.utils.data.DataLoader(_ImageData(batches * batch_size, key, channel_last), batch_size=batch_size)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[log])
    trainer.fit(model, data)
    return log


def steps_between(log: StepLog, final: int) -> list[tuple[int, int]]:
    """``(optimizer index, how far TDC num_steps moved from before this step to before the next)``."""
    counts = [n for _, n in log.events] + [final]
    return [(idx, counts[i + 1] - counts[i]) for i, (idx, _) in enumerate(log.events)]
