"""GaussianQuantize vs vector-quantize-pytorch's VectorQuantize: same shapes, dtypes, contract."""

import pytest
import torch
from torch import nn

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import VectorQuantize  # noqa: E402

from gq_plugin import GaussianQuantizer  # noqa: E402
from gq_plugin.adapters import GaussianQuantize, register_with_vector_quantize_pytorch  # noqa: E402


def _compare(vq, gq, x_vq, x_gq, train):
    vq.train(train)
    gq.train(train)
    q1, i1, l1 = vq(x_vq)
    q2, i2, l2 = gq(x_gq)
    assert q1.shape == q2.shape and q1.dtype == q2.dtype
    assert i1.shape == i2.shape and i1.dtype == i2.dtype == torch.int64
    assert l1.shape == l2.shape == ()
    return q2, i2, l2


@pytest.mark.parametrize("train", [True, False])
def test_sequences_b_n_d(train):
    torch.manual_seed(0)
    dim, K = 16, 256
    vq = VectorQuantize(dim=dim, codebook_size=K)
    gq = GaussianQuantize(dim=dim, codebook_size=K)
    x = torch.randn(2, 50, dim)
    post = torch.cat([torch.randn(2, 50, dim), torch.full((2, 50, dim), -2.0)], dim=-1)
    q, idx, loss = _compare(vq, gq, x, post, train)
    assert idx.shape == (2, 50)
    if not train:
        assert float(loss) == 0.0
        assert torch.equal(gq.get_output_from_indices(idx), q)
        assert torch.equal(gq.get_codes_from_indices(idx), q)
    else:
        assert float(loss) > 0  # TDC loss
    assert gq.codebook.shape == (K, dim) == vq.codebook.shape


@pytest.mark.parametrize("train", [True, False])
def test_image_fmap_b_d_h_w(train):
    torch.manual_seed(0)
    dim, K = 8, 128
    vq = VectorQuantize(dim=dim, codebook_size=K, accept_image_fmap=True)
    gq = GaussianQuantize(dim=dim, codebook_size=K, accept_image_fmap=True)
    x = torch.randn(2, dim, 6, 5)
    post = torch.randn(2, 2 * dim, 6, 5)
    q, idx, _ = _compare(vq, gq, x, post, train)
    assert idx.shape == (2, 6, 5)
    if not train:
        assert torch.equal(gq.get_output_from_indices(idx), q)
        # also as a (mean, logvar) pair
        q2, idx2, _ = gq(post.chunk(2, dim=1))
        assert torch.equal(idx2, idx) and torch.equal(q2, q)


def test_single_tokens_b_d():
    vq = VectorQuantize(dim=8, codebook_size=32).eval()
    gq = GaussianQuantize(dim=8, codebook_size=32).eval()
    q, idx, _ = _compare(vq, gq, torch.randn(3, 8), torch.randn(3, 16), False)
    assert idx.shape == (3,) and torch.equal(gq.get_output_from_indices(idx), q)


def test_channel_first_sequences():
    vq = VectorQuantize(dim=8, codebook_size=64, channel_last=False).eval()
    gq = GaussianQuantize(dim=8, codebook_size=64, channel_last=False).eval()
    _compare(vq, gq, torch.randn(2, 8, 30), torch.randn(2, 16, 30), False)


def test_multi_head_indices():
    dim, heads = 16, 4
    vq = VectorQuantize(dim=dim, codebook_size=64, heads=heads, codebook_dim=dim // heads, separate_codebook_per_head=True).eval()
    gq = GaussianQuantize(dim=dim, codebook_size=64, heads=heads, codebook_dim=dim // heads).eval()
    q, idx, _ = _compare(vq, gq, torch.randn(2, 20, dim), torch.randn(2, 20, 2 * dim), False)
    assert idx.shape == (2, 20, heads) and gq.codebook_dim == 4 and not gq.has_projections
    assert torch.equal(gq.get_output_from_indices(idx), q)
    vqi = VectorQuantize(
        dim=dim, codebook_size=64, heads=heads, codebook_dim=4, separate_codebook_per_head=True, accept_image_fmap=True
    ).eval()
    gqi = GaussianQuantize(dim=dim, codebook_size=64, heads=heads, codebook_dim=4, accept_image_fmap=True).eval()
    _, idx, _ = _compare(vqi, gqi, torch.randn(2, dim, 4, 4), torch.randn(2, 2 * dim, 4, 4), False)
    assert idx.shape == (2, 4, 4, heads)
    # heads * codebook_dim != dim: a projection, as in VectorQuantize
    vqp_ = VectorQuantize(dim=16, codebook_size=64, heads=4, codebook_dim=8).eval()
    gqp = GaussianQuantize(dim=16, codebook_size=64, heads=4, codebook_dim=8).eval()
    q, idx, _ = _compare(vqp_, gqp, torch.randn(2, 20, 16), torch.randn(2, 20, 32), False)
    assert gqp.has_projections == vqp_.has_projections is True and idx.shape == (2, 20, 4)
    assert gqp.project_in[0].in_features == 32 and gqp.project_in[0].out_features == 64  # mean||logvar -> 2 * 4 * 8
    assert gqp.project_out.in_features == 32 and gqp.project_out.out_features == 16
    torch.testing.assert_close(gqp.get_output_from_indices(idx), q)
    assert gqp.get_codes_from_indices(idx).shape == (2, 20, 32)


def test_is_a_gaussian_quantizer_and_state_dict_roundtrip():
    gq = GaussianQuantize(dim=8, codebook_size=64, codebook_dim=4, heads=2)
    assert isinstance(gq, GaussianQuantizer) and not gq.has_projections
    core = GaussianQuantizer(8, 64, 4)
    core.load_state_dict(gq.state_dict())  # same buffers, same checks


class TinyAutoencoder(nn.Module):
    """The vector-quantize-pytorch examples' pattern: out, indices, aux_loss = model(x)."""

    def __init__(self, quantizer, q_in):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.GELU(), nn.Conv2d(8, q_in, 1))
        self.q = quantizer
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(8, 1, 4, 2, 1))

    def forward(self, x):
        z, indices, aux = self.q(self.enc(x))
        return self.dec(z), indices, aux


def test_swap_in_example_model_and_train():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    ref = TinyAutoencoder(VectorQuantize(dim=8, codebook_size=64, accept_image_fmap=True), 8)
    model = TinyAutoencoder(GaussianQuantize(dim=8, codebook_size=64, accept_image_fmap=True), 16)  # only the encoder head doubles
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for m in (ref, model):
        out, idx, aux = m(x)
        assert out.shape == x.shape and idx.shape == (4, 8, 8)
    w0 = model.enc[0].weight.clone()
    out, idx, aux = model(x)
    ((out - x).abs().mean() + 1e-3 * aux).backward()
    opt.step()
    assert not torch.equal(w0, model.enc[0].weight)
    model.eval()
    out, idx, aux = model(x)
    assert float(aux) == 0 and idx.dtype == torch.int64


def test_registered_in_vector_quantize_pytorch_sequential():
    from vector_quantize_pytorch import Sequential, utils

    assert register_with_vector_quantize_pytorch()
    assert GaussianQuantize in utils.QUANTIZE_KLASSES
    seq = Sequential(nn.Linear(4, 16), GaussianQuantize(dim=8, codebook_size=32), nn.Linear(8, 4)).eval()
    out, idx, loss = seq(torch.randn(2, 5, 4))
    assert out.shape == (2, 5, 4) and idx.shape == (2, 5)
