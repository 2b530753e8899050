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
from ._posterior import posterior_of


class GQAutoencoderOutput(NamedTuple):
    """What :class:`GQAutoencoderWrapper` returns (one output type for every bottleneck)."""

    sample: torch.Tensor  # reconstruction
    loss: torch.Tensor  # the bottleneck's loss, scalar: TDC (GQ train), 0 (GQ eval), KL bits, a quantizer's aux loss
    indices: torch.Tensor | None  # indices (GQ eval, or training with return_indices_in_train=True)
    latents: torch.Tensor  # what the decoder saw: reparameterised sample (train) / z_hat (eval)
    posterior: Any  # the encoder's posterior (GQ: mean, logvar, rates(), ...)


def _sample_of(decoded):
    if hasattr(decoded, "sample") and not callable(decoded.sample):
        return decoded.sample  # diffusers DecoderOutput
    if isinstance(decoded, tuple):
        return decoded[0]
    return decoded


class GQAutoencoderWrapper(nn.Module):
    """Route encode -> posterior -> bottleneck -> decode through ``forward``.

    Default bottleneck (``bottleneck=None``): the GQ posterior of a model patched by
    :func:`patch_autoencoder_kl` / :func:`patch_sd3_vae` (diffusers) or :func:`patch_ldm_autoencoder`
    (ldm-style): training uses ``posterior.sample()`` and the TDC loss ``posterior.kl().mean()``,
    eval the GQ latent and its indices. Any other bottleneck over the encoder's posterior (a plain
    KL VAE, a baseline quantizer on the mean) is a module
    ``bottleneck(posterior, generator) -> (latents, loss, indices)``; its parameters train with the model.
    """

    def __init__(self, model: nn.Module, return_indices_in_train: bool = False, bottleneck: nn.Module | None = None) -> None:
        super().__init__()
        if bottleneck is None and not is_patched(model):
            raise ValueError("GQAutoencoderWrapper needs a GQ-patched model (patch_autoencoder_kl / patch_ldm_autoencoder) "
                             "or a bottleneck")
        self.model = model
        self.bottleneck = bottleneck
        self.return_indices_in_train = return_indices_in_train
        self.train(model.training)  # follow the wrapped model's mode: a wrapper of an eval model is GQ at once

    @property
    def quantizer(self):
        """The GQ quantizer of the patched model, or the bottleneck's ``quantizer`` (None if it has none)."""
        if self.bottleneck is not None:
            return getattr(self.bottleneck, "quantizer", None)
        return quantizer_of(self.model)

    def _gq(self, posterior, generator):
        if self.training:
            indices = posterior.indices if self.return_indices_in_train else None
            # unscaled: the host-KL-weight compensation belongs in kl() only
            return posterior.sample(generator), posterior.tdc_loss(), indices
        return posterior.mode(), torch.zeros((), device=posterior.mean.device), posterior.indices

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> GQAutoencoderOutput:
        posterior = posterior_of(self.model.encode(x))
        if self.bottleneck is None:
            z, loss, indices = self._gq(posterior, generator)
        else:
            z, loss, indices = self.bottleneck(posterior, generator)
        recon = _sample_of(self.model.decode(z))
        return GQAutoencoderOutput(recon, loss, indices, z, posterior)
