"""Registry: every quantizer builds by name and runs on a (2, C, 8, 8) latent."""

import subprocess
import sys

import pytest
import torch

from gq_plugin.lab.registry import available_quantizers, build_quantizer, needs_posterior

C = 8
pytest.importorskip("vector_quantize_pytorch")

# name -> (kwargs, expected eval index shape, bits_per_token)
CASES = {
    "gq": (dict(bits_per_token=8, codebook_dim=4), (2, 8, 8, 2), 8),  # core layout (B, H, W, G)
    "vq": (dict(bits_per_token=8), (2, 8, 8), 8),
    "simvq": (dict(bits_per_token=8), (2, 8, 8), 8),
    "fsq": (dict(bits_per_token=8), (2, 8, 8), None),  # [8, 6, 5] = 240 codes ~ 7.9 bits
    "lfq": (dict(bits_per_token=8), (2, 8, 8), 8),
    "bsq": (dict(codebook_size=2**8), (2, 8, 8), 8),
    "tokenbridge": (dict(bits_per_token=48), (2, C, 8, 8), 48),
}


def test_all_names_covered():
    assert sorted(CASES) == available_quantizers() == ["bsq", "fsq", "gq", "lfq", "simvq", "tokenbridge", "vq"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_and_forward(name):
    kwargs, idx_shape, bits = CASES[name]
    q = build_quantizer(name, C, **kwargs)
    assert q.needs_posterior == needs_posterior(name) == (name == "gq")
    z = torch.randn(2, 2 * C if q.needs_posterior else C, 8, 8)
    for train in (True, False):
        q.train(train)
        z_q, idx, aux = q(z)
        assert z_q.shape == (2, C, 8, 8)
        assert aux.ndim == 0
        if train and name == "gq":
            assert idx is None  # no search in training unless search_in_train=True
            continue
        assert idx.shape == idx_shape and idx.dtype == torch.int64
        assert int(idx.min()) >= 0 and int(idx.max()) < q.codebook_size
    if bits is not None:
        assert q.bits_per_token == bits
    else:
        assert 7.5 < q.bits_per_token <= 8


def test_matched_16_bits():
    for name in ("gq", "vq", "simvq", "fsq", "lfq", "bsq"):
        q = build_quantizer(name, 16, bits_per_token=16, **({"kmeans_init": False} if name == "vq" else {}))
        assert 15.9 < q.bits_per_token <= 16.0, name
    assert build_quantizer("fsq", 16, 16).levels == [8, 8, 8, 5, 5, 5]
    assert build_quantizer("tokenbridge", 16, bits_per_token=96).bits_per_token == 96


def test_vq_large_codebook_options_reach_vector_quantize():
    """The headline scale's VQ: a low-dimensional cosine lookup with the rotation trick and dead-code replacement."""
    q = build_quantizer("vq", 16, codebook_size=2**10, lookup_dim=8, use_cosine_sim=True, rotation_trick=True,
                        threshold_ema_dead_code=2, kmeans_init=False)
    vq = q.q
    assert vq.has_projections and vq.project_in.out_features == 8 and tuple(vq.codebook.shape) == (2**10, 8)
    assert vq.use_cosine_sim and vq.rotation_trick
    cb = vq._codebook
    if hasattr(cb, "dead_code_threshold_ratio"):  # vector-quantize-pytorch >= 1.34 converts the absolute count
        assert cb.dead_code_threshold_ratio == pytest.approx(2 / 2**10) and cb.has_dead_code_replacement
        ratio = build_quantizer("vq", 16, codebook_size=2**10, dead_code_threshold_ratio=0.5, kmeans_init=False).q._codebook
        assert ratio.dead_code_threshold_ratio == 0.5  # the ratio form reaches the library as given
    else:
        assert cb.threshold_ema_dead_code == 2
    z_q, idx, _ = q(torch.randn(2, 16, 4, 4))
    assert z_q.shape == (2, 16, 4, 4) and idx.shape == (2, 4, 4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: \['bsq', 'fsq', 'gq', 'lfq', 'simvq', 'tokenbridge', 'vq'\]"):
        build_quantizer("rvq", 8)
    with pytest.raises(ValueError, match="must divide"):
        build_quantizer("gq", 8, 16, codebook_dim=3)


def test_adapters_import_without_foreign_libraries():
    code = (
        "import sys\n"
        "for m in ('diffusers', 'vector_quantize_pytorch', 'taming', 'sgm', 'ldm'): sys.modules[m] = None\n"
        "from gq_plugin import adapters\n"
        "from gq_plugin.lab import registry, baselines\n"
        "assert adapters.GaussianQuantize and adapters.GaussianVectorQuantizer and adapters.GaussianQuantRegularizer\n"
        "assert adapters.patch_ldm_autoencoder and adapters.swap_tokenbridge_quantizer\n"
        "registry.build_quantizer('gq', 4, 8)\n"
        "try:\n"
        "    adapters.patch_sd3_vae\n"
        "except ImportError as e:\n"
        "    assert 'gq-plugin[diffusers]' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected ImportError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
