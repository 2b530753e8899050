"""Issue #12 item 5 (loss scale): through the vq / taming quantizer APIs the TDC loss is per element.

``GaussianQuantize`` and ``GaussianVectorQuantizer`` return ``lam * mean over tokens and groups of
w_g * R_g`` (bits per sub-codebook), so adding it to a mean-reduced host loss needs no retuning:
it does not grow with the batch, the image size or the number of groups.
"""

import math

import torch

from gq_plugin import GaussianQuantizer
from gq_plugin.adapters import GaussianQuantize, GaussianVectorQuantizer


def _moments(b, c, h, w, logvar=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(b, c, h, w, generator=g), torch.full((b, c, h, w), logvar)], 1)


def test_taming_loss_is_the_per_element_mean_of_the_core_loss():
    z = _moments(2, 8, 6, 5)
    q = GaussianVectorQuantizer(256, 8, codebook_dim=2, tdc_auto_step=False).train()
    core = GaussianQuantizer(8, 256, 2, accept_image_fmap=True, tdc_auto_step=False).train()
    _, loss, _ = q(z)
    _, _, core_loss = core(z)
    torch.testing.assert_close(loss, core_loss / (6 * 5 * 4))  # 30 positions x 4 groups per image
    rates = core.rates(z)
    torch.testing.assert_close(loss, (core.tdc.weights(rates) * rates).mean())


def test_taming_loss_does_not_grow_with_the_image():
    small = GaussianVectorQuantizer(256, 8, tdc_auto_step=False).train()
    large = GaussianVectorQuantizer(256, 8, tdc_auto_step=False).train()
    _, l_small, _ = small(_moments(1, 8, 4, 4, seed=1))
    _, l_large, _ = large(_moments(8, 8, 32, 32, seed=1))
    assert 0.8 < float(l_large) / float(l_small) < 1.25  # a sum would be 512x larger


def test_vq_api_loss_equals_mean_rate_in_the_band():
    # logvar such that every group's rate is inside the band -> w = 1, lam = 1: loss = mean rate
    gq = GaussianQuantize(dim=4, codebook_size=2**8, tdc_auto_step=False).train()
    x = torch.cat([torch.zeros(3, 10, 4), torch.full((3, 10, 4), -2.0 * math.log(2) * 8 / 4 - 0.0)], -1)
    rates = gq.rates(x)
    _, _, loss = gq(x)
    torch.testing.assert_close(loss, (gq.tdc.weights(rates) * rates).mean())
    assert loss.ndim == 0
