"""vector-quantize-pytorch 1.32.0's own README examples for VectorQuantize, run with GaussianQuantize.

Each example is run twice: as written with the real ``VectorQuantize``, and with
``GaussianQuantize`` substituted (same constructor call; the input carries ``2 * dim`` channels,
mean || logvar, the one documented difference). Output, index and loss shapes must agree.
Examples for other classes (ResidualVQ, FSQ, LFQ, ...) are outside the contract.
"""

import warnings

import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import VectorQuantize  # noqa: E402

from gq_plugin.adapters import GaussianQuantize  # noqa: E402

# (README section, constructor kwargs, VectorQuantize input shape, expected (quantized, indices) shapes,
#  options GaussianQuantize must name in its one warning)
EXAMPLES = [
    ("Usage", dict(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0), (1, 1024, 256),
     ((1, 1024, 256), (1, 1024)), ["decay"]),
    ("Lower codebook dimension", dict(dim=256, codebook_size=256, codebook_dim=16), (1, 1024, 256),
     ((1, 1024, 256), (1, 1024)), []),
    ("Cosine similarity", dict(dim=256, codebook_size=256, use_cosine_sim=True), (1, 1024, 256),
     ((1, 1024, 256), (1, 1024)), ["use_cosine_sim"]),
    ("Expiring stale codes", dict(dim=256, codebook_size=512, threshold_ema_dead_code=2), (1, 1024, 256),
     ((1, 1024, 256), (1, 1024)), ["threshold_ema_dead_code"]),
    ("Orthogonal regularization loss", dict(dim=256, codebook_size=256, accept_image_fmap=True, orthogonal_reg_weight=10,
     orthogonal_reg_max_codes=128, orthogonal_reg_active_codes_only=False), (1, 256, 32, 32),
     ((1, 256, 32, 32), (1, 32, 32)), ["orthogonal_reg_weight", "orthogonal_reg_max_codes"]),
    ("Multi-headed VQ", dict(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=True, codebook_size=8196,
     accept_image_fmap=True), (1, 256, 32, 32), ((1, 256, 32, 32), (1, 32, 32, 8)), ["separate_codebook_per_head"]),
    ("Gradient Computation (rotation trick)", dict(dim=256, codebook_size=256, rotation_trick=True), (1, 64, 256),
     ((1, 64, 256), (1, 64)), ["rotation_trick"]),
]


def _gq_input(shape, image):
    if image:  # (b, d, h, w) -> (b, 2d, h, w)
        return torch.cat([torch.randn(shape), torch.full(shape, -4.0)], 1)
    return torch.cat([torch.randn(shape), torch.full(shape, -4.0)], -1)


@pytest.mark.parametrize("section,kwargs,in_shape,expected,named", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_readme_example(section, kwargs, in_shape, expected, named):
    torch.manual_seed(0)
    vq = VectorQuantize(**kwargs)
    qv, iv, lv = vq(torch.randn(in_shape))  # as in the README (training mode)
    assert (tuple(qv.shape), tuple(iv.shape)) == expected
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gq = GaussianQuantize(**kwargs)
    ours = [str(w.message) for w in rec if "GaussianQuantize ignores" in str(w.message)]
    assert len(ours) == (1 if named else 0)
    for name in named:
        assert name in ours[0]
    x = _gq_input(in_shape, kwargs.get("accept_image_fmap", False))
    q, idx, loss = gq(x)
    assert q.shape == qv.shape and idx.shape == iv.shape and idx.dtype == iv.dtype == torch.int64
    assert loss.shape == lv.shape == () and float(loss.detach()) > 0
    gq.eval()
    q, idx, loss = gq(x)
    assert q.shape == qv.shape and idx.shape == iv.shape and float(loss) == 0.0
    torch.testing.assert_close(gq.get_output_from_indices(idx), q)
    assert int(idx.min()) >= 0 and int(idx.max()) < kwargs["codebook_size"]
