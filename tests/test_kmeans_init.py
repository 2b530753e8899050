"""k-means init of a VQ codebook from N >= K encoder latents (issue #26: "k-means init fed at least K vectors")."""

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")
vqp_mod = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")

from gq_plugin.lab.baselines.kmeans import chunked_kmeans, init_codebook_
from gq_plugin.lab.baselines.vqp import SimVQBaseline, VQBaseline

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
from test_train_cli import photo_dir, write_recipe  # noqa: F401  (the trainer tests' photo fixture and recipe writer)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_kmeans_is_the_librarys_kmeans(cosine, chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 5, generator=g)  # two codebooks (heads)
    if cosine:
        x = torch.nn.functional.normalize(x, dim=-1)
    torch.manual_seed(11)
    ref_means, ref_bins = vqp_mod.kmeans(x, 40, 6, use_cosine_sim=cosine)
    torch.manual_seed(11)
    means, bins = chunked_kmeans(x, 40, 6, use_cosine_sim=cosine, chunk=chunk)
    assert torch.equal(bins, ref_bins)
    torch.testing.assert_close(means, ref_means, rtol=0, atol=1e-6)
    assert int(bins.sum()) == 2 * 300


def test_chunked_kmeans_calls_the_all_reduce_on_counts_and_means_every_iteration():
    seen = []
    chunked_kmeans(torch.randn(1, 50, 3), 8, 3, all_reduce_fn=lambda t: seen.append(tuple(t.shape)))
    assert seen == [(1, 8), (1, 8, 3)] * 3
    with pytest.raises(ValueError, match="codebooks, N, dim"):
        chunked_kmeans(torch.randn(50, 3), 8)


@pytest.mark.parametrize("opts", [{}, {"codebook_dim": 2, "use_cosine_sim": True}])
def test_init_codebook_equals_the_layers_own_first_batch_init(opts):
    """Fed the same vectors, our init path (project_in, cosine norm, chunked k-means) leaves the codebook exactly
    where vector-quantize-pytorch's own first-forward init does."""
    torch.manual_seed(0)
    ours = VQBaseline(4, 32, kmeans_init_vectors=100, **opts)
    ref = VQBaseline(4, 32, **opts)
    ref.load_state_dict(ours.state_dict())
    z = torch.randn(3, 4, 6, 6)
    torch.manual_seed(5)
    ours.init_codebook(z)
    torch.manual_seed(5)
    ref.train()
    ref.q(z, freeze_codebook=True)  # the library's init on this "first batch", no EMA update
    assert bool(ours.q._codebook.initted) and bool(ref.q._codebook.initted)
    torch.testing.assert_close(ours.q._codebook.embed, ref.q._codebook.embed, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already initialised"):
        ours.init_codebook(z)  # a trained / initialised codebook is never overwritten
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        VQBaseline(4, 32, kmeans_init_vectors=100).init_codebook(torch.randn(3, 5, 6, 6))


def test_kmeans_init_vectors_is_checked():
    with pytest.raises(ValueError, match="needs kmeans_init=True"):
        VQBaseline(4, 32, kmeans_init=False, kmeans_init_vectors=100)
    with pytest.raises(ValueError, match=">= 0"):
        VQBaseline(4, 32, kmeans_init_vectors=-1)
    with pytest.raises(ValueError, match="no k-means init"):
        init_codebook_(SimVQBaseline(4, 32).q, torch.randn(10, 4), 4)
    assert SimVQBaseline(4, 32).kmeans_init_vectors == 0


def test_train_inits_the_codebook_on_n_latents_once_and_not_on_resume(photo_dir, tmp_path, monkeypatch):  # noqa: F811
    from gq_plugin.lab.cli import main as gq_main

    calls = []
    original = VQBaseline.init_codebook

    def spy(self, z):
        calls.append(tuple(z.shape))
        original(self, z)

    monkeypatch.setattr(VQBaseline, "init_codebook", spy)
    out = tmp_path / "vq"
    recipe = write_recipe(tmp_path / "vq.yaml", photo_dir, out,
                          quantizer={"name": "vq", "codebook_size": 64, "kmeans_init_vectors": 2500, "lookup_dim": 2},
                          train={"steps": 4, "ckpt_every": 2}, loss={"lpips": 0.0})
    assert gq_main(["train", str(recipe), "--quiet"]) == 0
    assert len(calls) == 1
    b, c, h, w = calls[0]
    assert c == 4 and b * h * w >= 2500 and (b - 4) * h * w < 2500  # whole batches of 4, no more than needed
    state = torch.load(out / "final" / "quantizer.pt", weights_only=True)
    assert bool(next(v for k, v in state.items() if k.endswith("initted")))
    # a resume restores the trained codebook: no second init
    assert gq_main(["train", str(recipe), "--quiet", "--resume", str(out / "checkpoint-2")]) == 0
    assert len(calls) == 1
