"""diffusers: the training loop's KL scale must not switch TDC off (#12 item 3). diffusers models
carry no loss module, so the weight the loop multiplies ``posterior.kl()`` by is an argument."""

import pytest
import torch
from diffusers import AutoencoderKL

from gq_plugin import adapters


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32)


def _images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_kl_scale_argument_gives_tdc_its_intended_weight(tmp_path):
    vae = adapters.patch_autoencoder_kl(_vae(), K=2**6, m=2, host_kl_weight=1e-6, tdc_weight=0.5)
    posterior = vae.encode(_images()).latent_dist
    kl_term = 1e-6 * posterior.kl().mean()  # train_autoencoderkl.py: args.kl_scale * posterior.kl().mean()
    torch.testing.assert_close(kl_term, 0.5 * posterior.tdc_loss(), rtol=1e-5, atol=0)
    # saved with the model and re-applied on load
    vae.save_pretrained(str(tmp_path))
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    post = loaded.encode(_images()).latent_dist
    torch.testing.assert_close(1e-6 * post.kl().mean(), 0.5 * post.tdc_loss(), rtol=1e-5, atol=0)


def test_default_kl_is_the_tdc_loss_and_bad_weights_raise():
    vae = adapters.patch_autoencoder_kl(_vae(), K=2**6, m=2)
    posterior = vae.encode(_images()).latent_dist
    torch.testing.assert_close(posterior.kl().mean(), posterior.tdc_loss(), rtol=0, atol=0)
    for kwargs in ({"host_kl_weight": 0.0}, {"host_kl_weight": -1e-6}, {"tdc_weight": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            adapters.patch_autoencoder_kl(_vae(), K=2**6, m=2, **kwargs)
