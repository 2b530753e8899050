"""diffusers (issue #12 item 7, issue #14): a GQ VAE never passes silently as a continuous VAE, and
``encode_indices`` is not changed by ``enable_tiling()``. Against the real AutoencoderKL."""

import logging

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.utils import logging as dlog  # noqa: E402
from test_adapters_diffusers import tiny_sd3  # noqa: E402

from gq_plugin import adapters  # noqa: E402


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_plain_from_pretrained_warns_naming_the_gq_loader(tmp_path):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=16)
    vae.save_pretrained(tmp_path)
    handler = _Records()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    level = dlog.get_verbosity()
    dlog.set_verbosity_warning()  # diffusers' default
    try:
        plain = AutoencoderKL.from_pretrained(tmp_path)
    finally:
        root.removeHandler(handler)
        dlog.set_verbosity(level)
    assert not adapters.is_patched(plain)
    ignored = [m for m in handler.messages if "will be ignored" in m]
    assert len(ignored) == 1
    msg = ignored[0]
    # the first thing in diffusers' own warning says what happened and how to load it
    assert msg.index("NOTE") < msg.index("codebook_size")
    assert "WITHOUT GQ" in msg and "gq_plugin.adapters.load_pretrained_gq_vae(path)" in msg
    # the loader still restores the GQ VAE; patch_from_config skips the note
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    assert loaded.gq_quantizer.codebook_size == 2**8
    adapters.patch_from_config(plain)
    assert plain.gq_quantizer.codebook_dim == 16


@pytest.mark.parametrize("m", [16, 4])
def test_encode_indices_gives_the_untiled_tokens(m):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=m).eval()  # sample_size 32: tiles of 32 px
    torch.manual_seed(0)
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    untiled = vae.encode_indices(x)
    vae.enable_tiling()
    vae.tile_overlap_factor = 0.25
    with pytest.warns(UserWarning, match="ignores enable_tiling"):
        tiled = vae.encode_indices(x)
    assert vae.use_tiling  # switched back on
    assert torch.equal(tiled, untiled)
    # what the blended (tiled) moments would have given: a large share of the tokens differ
    moments = vae._encode(x)
    from_tiles = adapters.GQDiagonalGaussianDistribution(moments, vae.gq_quantizer).indices
    changed = float((from_tiles != untiled).float().mean())
    assert changed > 0.2, changed
