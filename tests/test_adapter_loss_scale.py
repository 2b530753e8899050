"""Issue #12 item 5 (loss scale): through the vq / taming quantizer APIs the TDC loss is normalised.

Default ``loss_reduction="element"``: ``lam * mean over tokens and groups of w_g * R_g / m`` --
bits per latent element, the scale of VectorQuantize's mean-squared commitment loss -- so adding
it to a mean-reduced host loss needs no retuning: it does not grow with the batch, the image
size or the number of groups. ``"group"`` (bits per sub-codebook) and ``"sum"`` (the paper's scale).
"""

import pytest
import torch

from gq_plugin import GaussianQuantizer
from gq_plugin.adapters import GaussianQuantize, GaussianVectorQuantizer


def _moments(b, c, h, w, logvar=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(b, c, h, w, generator=g), torch.full((b, c, h, w), logvar)], 1)


@pytest.mark.parametrize("reduction,divisor", [("element", 6 * 5 * 8), ("group", 6 * 5 * 4), ("sum", 1)])
def test_taming_loss_reductions_of_the_core_loss(reduction, divisor):
    z = _moments(2, 8, 6, 5)
    q = GaussianVectorQuantizer(256, 8, codebook_dim=2, tdc_auto_step=False, tdc_rule="reference", loss_reduction=reduction).train()
    core = GaussianQuantizer(8, 256, 2, accept_image_fmap=True, tdc_auto_step=False, tdc_rule="reference").train()
    _, loss, _ = q(z)
    _, _, core_loss = core(z)  # lam * mean over batch of the sum over 30 positions x 4 groups
    torch.testing.assert_close(loss, core_loss / divisor)
    if reduction == "element":
        rates = core.rates(z)
        torch.testing.assert_close(loss, (core.tdc.weights(rates) * rates).mean() / 2)


def test_taming_loss_does_not_grow_with_the_image():
    small = GaussianVectorQuantizer(256, 8, tdc_auto_step=False).train()
    large = GaussianVectorQuantizer(256, 8, tdc_auto_step=False).train()
    _, l_small, _ = small(_moments(1, 8, 4, 4, seed=1))
    _, l_large, _ = large(_moments(8, 8, 32, 32, seed=1))
    assert 0.8 < float(l_large) / float(l_small) < 1.25  # a sum would be 512x larger
    with pytest.raises(ValueError, match="loss_reduction"):
        GaussianVectorQuantizer(256, 8, loss_reduction="mean")


@pytest.mark.parametrize("reduction", ["element", "group", "sum"])
def test_vq_api_loss_reductions(reduction):
    gq = GaussianQuantize(dim=8, codebook_size=2**8, heads=2, codebook_dim=4, tdc_auto_step=False, tdc_rule="reference", loss_reduction=reduction).train()
    x = torch.cat([torch.randn(3, 10, 8), torch.full((3, 10, 8), -2.0)], -1)
    rates = gq.rates(x)  # (3, 10, 2)
    wr = gq.tdc.weights(rates) * rates
    _, _, loss = gq(x)
    want = {"element": wr.mean() / 4, "group": wr.mean(), "sum": wr.sum() / 3}[reduction]
    torch.testing.assert_close(loss, want)


def test_vq_api_scale_next_to_vector_quantize():
    """The README's first VectorQuantize example: commitment loss ~1.0; GQ's per-element TDC loss on a
    unit-variance posterior is O(1) too (0.72), where the summed loss is ~1.9e5."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=256, codebook_size=512)
    _, _, commit = vq(torch.randn(1, 1024, 256))
    x = torch.cat([torch.randn(1, 1024, 256), torch.zeros(1, 1024, 256)], -1)
    _, _, loss = GaussianQuantize(dim=256, codebook_size=512, search_in_train=False, tdc_rule="reference").train()(x)
    _, _, summed = GaussianQuantize(dim=256, codebook_size=512, search_in_train=False, tdc_rule="reference", loss_reduction="sum").train()(x)
    assert 0.5 < float(commit.detach()) < 2.0 and 0.5 < float(loss.detach()) < 1.0
    assert float(summed) > 1e5
