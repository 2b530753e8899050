"""``GQAutoencoderWrapper``: encode -> (sample | GQ) -> decode inside one ``forward``.

Distributed data parallel only synchronises gradients of computation run through the
wrapped module's ``forward``. Training loops that call ``ddp.module.encode(...)`` /
``accelerator.unwrap_model(vae).encode(...)`` bypass it and leave the encoder's gradients
unsynchronised across ranks (docs/ecosystem notes, diffusers #10614). Wrap a patched model
and call the wrapper instead::

    model = accelerator.prepare(GQAutoencoderWrapper(vae))
    out = model(images)            # out.sample, out.loss (TDC), out.indices, out.posterior
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ._patch import is_patched, quantizer_of


class GQAutoencoderOutput(NamedTuple):
    sample: torch.Tensor  # reconstruction
    loss: torch.Tensor  # TDC loss (scalar); 0 in eval
    indices: torch.Tensor | None  # GQ indices (eval, or training with return_indices=True)
    latents: torch.Tensor  # what the decoder saw: reparameterised sample (train) / z_hat (eval)
    posterior: Any  # the GQ posterior (mean, logvar, rates(), ...)


def _posterior_of(encoded):
    if hasattr(encoded, "latent_dist"):  # diffusers AutoencoderKLOutput
        return encoded.latent_dist
    if isinstance(encoded, tuple):
        return encoded[0]
    return encoded  # ldm returns the posterior itself


def _sample_of(decoded):
    if hasattr(decoded, "sample") and not callable(decoded.sample):
        return decoded.sample  # diffusers DecoderOutput
    if isinstance(decoded, tuple):
        return decoded[0]
    return decoded


class GQAutoencoderWrapper(nn.Module):
    """Route encode -> posterior -> (train: sample, TDC | eval: GQ) -> decode through ``forward``.

    Works with models patched by :func:`patch_autoencoder_kl` / :func:`patch_sd3_vae` (diffusers)
    and :func:`patch_ldm_autoencoder` (ldm-style).
    """

    def __init__(self, model: nn.Module, return_indices_in_train: bool = False) -> None:
        super().__init__()
        if not is_patched(model):
            raise ValueError("GQAutoencoderWrapper needs a GQ-patched model (patch_autoencoder_kl / patch_ldm_autoencoder)")
        self.model = model
        self.return_indices_in_train = return_indices_in_train

    @property
    def quantizer(self):
        return quantizer_of(self.model)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> GQAutoencoderOutput:
        posterior = _posterior_of(self.model.encode(x))
        if self.training:
            z = posterior.sample(generator)
            loss = posterior.kl().mean()
            indices = posterior.indices if self.return_indices_in_train else None
        else:
            z = posterior.mode()
            loss = torch.zeros((), device=x.device)
            indices = posterior.indices
        recon = _sample_of(self.model.decode(z))
        return GQAutoencoderOutput(recon, loss, indices, z, posterior)
