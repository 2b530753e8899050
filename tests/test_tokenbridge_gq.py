"""TokenBridge with GQ (issue #12 item 6), against a stand-in with TokenBridge's published interface
(YuqingWang1029/TokenBridge @ 3ede2818251c7b47427c470e07da9409afd66f71; TokenBridge is not on PyPI).

m > 1 trains and samples through the rebuilt group-AR head; state dicts load strictly; an original
checkpoint never brings TokenBridge's own table back; the post-training quantisation counterpart.
Set TOKENBRIDGE_SRC to a TokenBridge checkout to run the same swap on the real model class
(tests/test_tokenbridge_real.py).
"""

import copy
import warnings

import pytest
import torch
from _tokenbridge_standin import TokenBridgeMini

from gq_plugin import GaussianQuantizer, adapters
from gq_plugin.adapters._ar_head import GroupARHead
from gq_plugin.lab.baselines import TokenBridgeQuantizer

SCALE = 0.2325


def _inputs(b=2, c=16, seed=0, logvar=-3.0):
    g = torch.Generator().manual_seed(seed)
    return adapters.tokenbridge_gq_inputs(mean=torch.randn(b, c, 4, 4, generator=g), logvar=torch.full((b, c, 4, 4), logvar))


def _swapped(m, K, seed=0, **kw):
    torch.manual_seed(seed)
    model = TokenBridgeMini()
    adapters.swap_tokenbridge_quantizer(model, K=K, m=m, search_backend="torch", head_kwargs={"width": 16, "depth": 1, "num_heads": 2}, **kw)
    return model


def _distance_to_codewords(latents, gq):
    """Largest distance of any (token, group) of (B, C, h, w) latents in normalised units to its nearest GQ codeword."""
    z = (latents / SCALE).permute(0, 2, 3, 1).reshape(-1, gq.num_codebooks, gq.codebook_dim)
    d = (z.reshape(-1, 1, gq.codebook_dim).double() - gq.codebook.double()).square().sum(-1).sqrt()
    return float(d.min(1).values.max())


def test_tokenbridges_own_forward_with_m4_is_the_reported_failure():
    """Why the head is rebuilt: TokenBridge's forward indexes 16 channels of the 4 group tokens."""
    model = _swapped(4, 2**8)
    with pytest.raises(IndexError, match="out of bounds"):
        TokenBridgeMini.forward(model, _inputs(), torch.tensor([0, 1]))  # the class's forward, not the swapped one
    assert torch.isfinite(model(_inputs(), torch.tensor([0, 1])))


@pytest.mark.parametrize("m,K", [(4, 2**8), (16, 2**16)])
def test_m_gt_1_trains_and_samples(m, K):
    model = _swapped(m, K)
    g = 16 // m
    assert isinstance(model.gq_ar_head, GroupARHead) and model.gq_ar_head.num_groups == g
    assert model.gq_ar_head.factorized == (K > 4096)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("channel_heads", "token_embeddings", "condition_proj")) for n in names)  # old head detached
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, labels = _inputs(), torch.tensor([1, 2])
    losses = []
    for _ in range(3):
        loss = model(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert torch.isfinite(loss)
    assert model.gq_ar_head.cond_proj.weight.grad is not None and model.z_proj.weight.grad is not None
    # first loss ~ log K nats per code (an untrained head spreads its mass)
    assert abs(losses[0] - torch.log(torch.tensor(float(K))).item()) < 0.35 * torch.log(torch.tensor(float(K))).item()
    model.eval()
    out = model.sample_tokens(2, num_iter=3, labels=torch.tensor([0, 1]), temperature=1.0, cfg=2.0,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16, 4, 4)
    tokens = model.gq_last_tokens
    assert tokens.shape == (2, 16, g) and int(tokens.min()) >= 0 and int(tokens.max()) < K
    torch.testing.assert_close(model.patchify(out), model.dequantize_tokens(tokens))
    assert _distance_to_codewords(out, model.gq_quantizer) < 1e-5  # every sampled value is a GQ codeword


def test_swapped_state_dict_loads_strictly_into_a_fresh_swap():
    a, b = _swapped(4, 2**8, seed=0), _swapped(4, 2**8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = _inputs()
    torch.manual_seed(5)
    la = a(x, torch.tensor([0, 1]))
    torch.manual_seed(5)
    lb = b(x, torch.tensor([0, 1]))
    torch.testing.assert_close(la, lb)
    # TokenBridge's engine: EMA parameters swapped in by name, then a strict load
    ema = copy.deepcopy(a.state_dict())
    for name, p in a.named_parameters():
        ema[name] = p.detach() * 0.5
    b.load_state_dict(ema)


def test_original_checkpoint_never_reverts_to_tokenbridges_table_m1():
    original = TokenBridgeMini().state_dict()
    model = TokenBridgeMini()
    adapters.swap_tokenbridge_quantizer(model, m=1, search_backend="torch")  # K = quant_levels: TokenBridge's own head kept
    gq = model.gq_quantizer
    gq_table = model.reconstruction_values.clone()
    assert not torch.equal(gq_table, original["reconstruction_values"])
    with pytest.warns(UserWarning, match="kept the GQ reconstruction_values"):
        result = model.load_state_dict(original, strict=False)  # what TokenBridge users do today
    assert torch.equal(model.reconstruction_values, gq_table)
    assert all(k.startswith("gq_quantizer.") for k in result.missing_keys)
    model.eval()
    out = model.sample_tokens(2, num_iter=2)  # TokenBridge's own sampler and head, GQ table
    assert _distance_to_codewords(out, gq) < 1e-5
    # what happened before: TokenBridge's table -> samples off the GQ codewords by up to 3.5 (normalised units)
    stale = TokenBridgeQuantizer(bits=6).values()
    far = float((stale[:, None] - gq.codebook[:, 0] * SCALE).abs().min(1).values.max())
    assert 3.4 < far < 3.7


def test_original_checkpoint_into_m4_swap():
    original = TokenBridgeMini().state_dict()
    model = _swapped(4, 2**8)
    assert model.reconstruction_values is None  # no scalar table with m > 1
    with pytest.warns(UserWarning, match="gq_ar_head"):
        model.load_state_dict(original, strict=False)
    assert model.reconstruction_values is None and "reconstruction_values" not in model.state_dict()
    fresh = _swapped(4, 2**8)
    with pytest.warns(UserWarning, match="train it"):
        report = adapters.load_tokenbridge_checkpoint(fresh, {"model": original, "epoch": 3})
    assert "reconstruction_values" in report["left_out"] and any(k.startswith("channel_heads.") for k in report["left_out"])
    assert report["untrained"] and all(k.startswith("gq_ar_head.") for k in report["untrained"])
    assert torch.equal(fresh.z_proj.weight, original["z_proj.weight"])
    broken = {k: v for k, v in original.items() if k != "z_proj.weight"}
    with pytest.raises(ValueError, match="z_proj.weight"):
        adapters.load_tokenbridge_checkpoint(_swapped(4, 2**8), broken)
    with pytest.raises(ValueError, match="swap_tokenbridge_quantizer"):
        adapters.load_tokenbridge_checkpoint(TokenBridgeMini(), original)


def test_unpatch_restores_tokenbridge_and_deepcopy_keeps_the_guard():
    model = TokenBridgeMini()
    names = [n for n, _ in model.named_parameters()]
    table = model.reconstruction_values.clone()
    adapters.swap_tokenbridge_quantizer(model, K=2**8, m=4, search_backend="torch")
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="dropped reconstruction_values"):
        twin.load_state_dict(TokenBridgeMini().state_dict(), strict=False)
    assert twin.reconstruction_values is None
    adapters.unpatch(model)
    assert [n for n, _ in model.named_parameters()] == names and torch.equal(model.reconstruction_values, table)
    assert not hasattr(model, "gq_ar_head") and not model._load_state_dict_pre_hooks
    loss = model(torch.randn(2, 16, 4, 4), torch.tensor([0, 1]))  # TokenBridge's own forward again
    assert torch.isfinite(loss)


def test_ar_head_option_checks():
    with pytest.raises(ValueError, match="ar_head='tokenbridge' needs m=1"):
        adapters.swap_tokenbridge_quantizer(TokenBridgeMini(), K=2**8, m=4, ar_head="tokenbridge")
    model = TokenBridgeMini()
    adapters.swap_tokenbridge_quantizer(model, m=1, ar_head="gq", search_backend="torch")
    assert model.gq_ar_head.num_groups == 16 and torch.equal(model.gq_ar_head.group_order, model.channel_order)


def test_gq_post_training_quantize_counterpart():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 16, 4, 4, generator=g), torch.full((2, 16, 4, 4), -1.0)
    for m in (1, 2):
        idx, deq = adapters.gq_post_training_quantize(mean=mean, logvar=logvar, bits=4, m=m, search_backend="torch")
        K = 2 ** (4 * m)
        ref = GaussianQuantizer(16, K, m, accept_image_fmap=True, search_backend="torch")
        z_hat, ref_idx = ref.quantize(mean, logvar)
        assert idx.shape == (2, 4, 4, 16 // m) and torch.equal(idx, ref_idx)
        torch.testing.assert_close(deq, z_hat * SCALE)
        assert ref.bits_per_token == 16 * 4  # TokenBridge's rate at bits=4: 4 bits per channel
    tb_idx, tb_deq = TokenBridgeQuantizer(bits=4).quantize(mean * SCALE)  # TokenBridge's step on the same latents
    assert tb_deq.shape == deq.shape and tb_idx.shape == mean.shape
    with pytest.raises(ValueError, match="posterior"):
        adapters.gq_post_training_quantize(mean=mean)
