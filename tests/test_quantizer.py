import json
import math
import struct

import pytest
import torch

from gq_plugin import GaussianQuantizer, codebook_usage, search_reference
from gq_plugin.codebook import group_channels
from gq_plugin.quantizer import GQConfig
from gq_plugin.tdc import TDCSettings


def make_moments(b=2, c=16, h=4, w=4, scale=1.0):
    mean = torch.randn(b, c, h, w) * scale
    logvar = torch.randn(b, c, h, w) * 0.3 - 2.0
    return mean, logvar


def test_image_fmap_eval_matches_search_on_groups():
    q = GaussianQuantizer(16, 2**10, 4, accept_image_fmap=True).eval()
    mean, logvar = make_moments()
    z, idx, loss = q(torch.cat([mean, logvar], 1))
    assert z.shape == (2, 16, 4, 4) and idx.shape == (2, 4, 4, 4) and idx.dtype == torch.int64
    assert loss.item() == 0.0
    rows_mu = group_channels(mean.permute(0, 2, 3, 1), 4).reshape(-1, 4)
    rows_lv = group_channels(logvar.permute(0, 2, 3, 1), 4).reshape(-1, 4)
    expected = search_reference(rows_mu, rows_lv, q.codebook).reshape(2, 4, 4, 4)  # (B, H, W, G), channel-last
    assert torch.equal(idx, expected)
    assert torch.equal(q.dequant(idx), z)
    # group g of token (b, h, w) is channels 4g..4g+3 and equals codebook[idx[b, h, w, g]]
    assert torch.equal(z[1, 4:8, 2, 3], q.codebook[idx[1, 2, 3, 1]])


@pytest.mark.parametrize("layout", ["seq_last", "seq_first", "single", "pair", "two_args"])
def test_layouts(layout):
    mean, logvar = torch.randn(3, 7, 8), torch.randn(3, 7, 8) * 0.2 - 1
    kw = dict(channel_last=layout != "seq_first")
    q = GaussianQuantizer(8, 256, 4, **kw).eval()
    if layout == "seq_last":
        z, idx, _ = q(torch.cat([mean, logvar], -1))
        assert z.shape == (3, 7, 8) and idx.shape == (3, 7, 2)
    elif layout == "seq_first":
        z, idx, _ = q(torch.cat([mean, logvar], -1).transpose(1, 2))
        assert z.shape == (3, 8, 7) and idx.shape == (3, 7, 2)
        z = z.transpose(1, 2)
    elif layout == "single":
        mean, logvar = mean[:, 0], logvar[:, 0]
        z, idx, _ = q(torch.cat([mean, logvar], -1))
        assert z.shape == (3, 8) and idx.shape == (3, 2)
    elif layout == "pair":
        z, idx, _ = q((mean, logvar))
    else:
        z, idx, _ = q(mean, logvar)
    ref = GaussianQuantizer(8, 256, 4).eval()
    z_ref, idx_ref, _ = ref(mean, logvar)
    assert torch.equal(idx, idx_ref) and torch.equal(z, z_ref)
    back = q.dequant(idx)
    assert torch.equal(back.transpose(1, 2) if layout == "seq_first" else back, z)


def test_strided_grouping_equals_contiguous_on_permuted_channels():
    mean, logvar = make_moments(c=16)
    strided = GaussianQuantizer(16, 512, 4, grouping="strided", accept_image_fmap=True).eval()
    contiguous = GaussianQuantizer(16, 512, 4, accept_image_fmap=True).eval()
    perm = torch.arange(16).view(4, 4).t().reshape(-1)  # strided group g = channels g, g+4, ...
    z_s, i_s, _ = strided(mean, logvar)
    z_c, i_c, _ = contiguous(mean[:, perm], logvar[:, perm])
    assert torch.equal(i_s, i_c)
    assert torch.equal(z_s[:, perm], z_c)


def test_train_mode_sample_and_tdc_loss():
    q = GaussianQuantizer(16, 2**8, 8, accept_image_fmap=True)
    mean = torch.randn(64, 16, 4, 4, requires_grad=True)
    logvar = torch.full((64, 16, 4, 4), -4.0, requires_grad=True)
    z, idx, loss = q(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert idx is None and z.shape == mean.shape
    resid = (z - mean).detach() / math.exp(-2.0)
    assert abs(resid.mean().item()) < 0.02 and abs(resid.std().item() - 1) < 0.02
    rates = q.rates(mean, logvar)  # (B, H, W, G)
    w = q.tdc.weights(rates)
    assert q.tdc.num_steps.item() == 1  # auto step after computing the loss with the old multipliers
    # multipliers were all 1; band rule (default, hinge at log2 K + alpha/2 = 8.25): sum R + sum max(R - 8.25, 0)
    expected = (rates * torch.ones_like(w) + (rates - 8.25).clamp_min(0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    ref = GaussianQuantizer(16, 2**8, 8, accept_image_fmap=True, tdc_rule="reference")
    assert ref.settings.flat()["tdc_rule"] == "reference" and q.settings.flat()["tdc_rule"] == "band"
    _, _, ref_loss = ref(mean, logvar, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ref_loss, rates.flatten(1).sum(1).mean())  # reference: lam * sum(w R), all weights 1
    loss.backward()
    assert mean.grad is not None and logvar.grad is not None


def test_search_in_train_returns_indices():
    q = GaussianQuantizer(8, 64, 8, search_in_train=True, tdc_auto_step=False)
    mean, logvar = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    _, idx, _ = q(mean, logvar)
    assert torch.equal(idx, q.eval()(mean, logvar)[1])


def test_state_dict_round_trip_and_mismatch_refusal():
    q = GaussianQuantizer(16, 2**10, 8, accept_image_fmap=True)
    for _ in range(5):
        q(*make_moments())
    sd = q.state_dict()
    assert set(sd) == {"codebook_fingerprint", "gq_config", "tdc.lam_global", "tdc.lam_max", "tdc.lam_min", "tdc.num_steps"}
    fresh = GaussianQuantizer(16, 2**10, 8, accept_image_fmap=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.tdc.lam_global, q.tdc.lam_global) and fresh.tdc.num_steps.item() == 5
    with pytest.raises(ValueError, match=r"codebook_size \(K\): checkpoint 1024 vs model 2048"):
        GaussianQuantizer(16, 2**11, 8).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"codebook_dim \(m\)"):
        GaussianQuantizer(16, 2**10, 4).load_state_dict(sd)
    with pytest.raises(ValueError, match="grouping: checkpoint 'contiguous' vs model 'strided'"):
        GaussianQuantizer(16, 2**10, 8, grouping="strided").load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        GaussianQuantizer(16, 2**10, 8, seed=0).load_state_dict(sd)
    with pytest.raises(ValueError, match="beta: checkpoint 1.0 vs model 0.0"):
        GaussianQuantizer(16, 2**10, 8, beta=0.0).load_state_dict(sd)
    tampered = dict(sd)
    tampered["codebook_fingerprint"] = sd["codebook_fingerprint"] + 1
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        fresh.load_state_dict(tampered)


def test_half_cast_keeps_exact_float32_codebook():
    q = GaussianQuantizer(8, 512, 8)
    cb = q.codebook.clone()
    q.half()
    assert q.codebook.dtype == torch.float32 and torch.equal(q.codebook, cb)
    q.float()
    assert torch.equal(q.codebook, cb)


def test_channels_last_and_bf16_inputs():
    q = GaussianQuantizer(16, 2**10, 16, accept_image_fmap=True).eval()
    x = torch.cat(make_moments(h=6, w=5), 1)
    ref_z, ref_i, _ = q(x)
    z, i, _ = q(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(i, ref_i) and torch.equal(z, ref_z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, i16, _ = q(x)
    assert torch.equal(i16, ref_i)


def _posterior_at_rate(n, m, bits_per_channel):
    """Posteriors whose aggregate matches the prior, with sigma = 2^-r: E[R_c] = r bits."""
    sigma = 2.0**-bits_per_channel
    mean = torch.randn(n, 1, m) * math.sqrt(1 - sigma**2)
    return mean, torch.full_like(mean, 2 * math.log(sigma)), sigma


def test_theorem_error_small_below_budget_and_grows_above():
    """log2 K = 12 bits per group of m=4 channels."""
    q = GaussianQuantizer(4, 2**12, 4).eval()
    errors = {}
    for r in (1.5, 2.0, 3.0, 4.0, 5.0):  # group rates 6, 8, 12, 16, 20 bits
        mean, logvar, sigma = _posterior_at_rate(2**14, 4, r)
        assert q.rates(mean, logvar).mean().item() == pytest.approx(4 * r, abs=0.1)
        z, idx, _ = q(mean, logvar)
        errors[r] = ((z - mean).abs() / sigma).mean().item()
        if r <= 2.0:  # rate well below log2 K
            assert errors[r] < 0.6
            usage = q.codebook_usage(idx)
            # 16384 tokens over 4096 codes: a uniform draw would use 1 - e^-4 = 98.2 %
            assert usage.usage > 0.95 and usage.perplexity > 0.8 * 4096
    assert errors[1.5] < errors[2.0] < errors[3.0] < errors[4.0] < errors[5.0]
    assert errors[5.0] > 4 * errors[2.0]


def test_codebook_usage_values():
    u = codebook_usage(torch.arange(8).repeat(3), 8)
    assert (u.used, u.usage, u.entropy_bits, u.perplexity) == (8, 1.0, 3.0, 8.0)
    u = codebook_usage(torch.zeros(10, dtype=torch.long), 8)
    assert (u.used, u.usage, u.entropy_bits, u.perplexity) == (1, 0.125, 0.0, 1.0)
    with pytest.raises(ValueError, match="indices"):
        codebook_usage(torch.tensor([8]), 8)


def test_bits_properties():
    q = GaussianQuantizer(16, 2**16, 8)
    assert q.num_codebooks == 2 and q.bits_per_token == 32 and q.bits_per_pixel(64) == 0.5


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(dim=16, codebook_size=256, codebook_dim=5), "codebook_dim=5 must divide"),
        (dict(dim=16, codebook_size=1, codebook_dim=4), "codebook_size"),
        (dict(dim=0, codebook_size=16), "dim"),
        (dict(dim=16, codebook_size=16, grouping="foo"), "grouping"),
        (dict(dim=16, codebook_size=16, codebook="uniform"), "codebook"),
        (dict(dim=16, codebook_size=16, lam_factor=1.0), "lam_factor"),
        (dict(dim=16, codebook_size=16, beta=float("nan")), "beta"),
    ],
)
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GaussianQuantizer(**kwargs)


def test_bad_forward_inputs():
    q = GaussianQuantizer(8, 64, 4, accept_image_fmap=True).eval()
    with pytest.raises(ValueError, match=r"x must carry mean and logvar: 2\*dim=16 channels"):
        q(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        q(torch.zeros(1, 16, 2))
    with pytest.raises(ValueError, match="logvar must be a tensor shaped like mean"):
        q(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 2, 3))
    bad = torch.zeros(1, 16, 2, 2)
    bad[0, 3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="mean contains non-finite"):
        q(bad)
    bad = torch.zeros(1, 16, 2, 2)
    bad[0, 12, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="logvar contains non-finite"):
        q(bad)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        q.dequant(torch.full((1, 2, 2, 2), 64))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        q.dequant(torch.full((1, 2, 2, 2), -1))
    with pytest.raises(ValueError, match=r"indices must be \(B, H, W, 2\)"):
        q.dequant(torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        q.dequant(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(mean, logvar\)"):
        q((torch.zeros(1, 8, 2, 2),))


def _legacy_buffer(K, m, grouping, kind, seed, dim, beta=None):
    """The int64 ``gq_config`` buffer gq-plugin <= 0.1 wrote: [K, m, grouping, kind, seed, dim]
    and, once it was stored, beta's float64 bits as an int64."""
    codes = [K, m, ("contiguous", "strided").index(grouping), ("sobol", "iid").index(kind), seed, dim]
    if beta is not None:
        codes.append(struct.unpack("<q", struct.pack("<d", beta))[0])
    return torch.tensor(codes, dtype=torch.int64)


def test_settings_serialise_one_way_and_old_checkpoints_still_load():
    q = GaussianQuantizer(16, 2**10, 8, accept_image_fmap=True, beta=0.5, tolerance=0.25, lam_factor=1.03)
    for _ in range(3):
        q(*make_moments())
    sd = q.state_dict()
    # the state-dict entry is GQConfig.to_json as uint8: every setting, TDC included
    assert sd["gq_config"].dtype == torch.uint8
    saved = json.loads(bytes(sd["gq_config"].tolist()).decode())
    assert saved == q.settings.to_dict() and saved["format"] == 2
    assert (saved["beta"], saved["tdc"]["tolerance"], saved["tdc"]["lam_factor"]) == (0.5, 0.25, 1.03)
    assert GQConfig.from_json(json.dumps(saved)) == q.settings
    # attributes changed after construction reach the saved settings, and loading still works
    q.tdc.auto_step = False
    assert json.loads(bytes(q.state_dict()["gq_config"].tolist()).decode())["tdc_auto_step"] is False
    other = GaussianQuantizer(16, 2**10, 8, accept_image_fmap=True, beta=0.5)
    other.search_backend = "torch"  # its settings JSON now differs in length from the checkpoint's
    other.load_state_dict(sd)
    assert other.settings.search_backend == "torch" and other.tdc.num_steps.item() == 3
    # checkpoints of the int64 layout (7 fields with beta bit-cast, and the older 6) load and are checked
    for beta in (0.5, None):
        old = dict(sd)
        old["gq_config"] = _legacy_buffer(2**10, 8, "contiguous", "sobol", 42, 16, beta)
        fresh = GaussianQuantizer(16, 2**10, 8, accept_image_fmap=True, beta=0.5)
        fresh.load_state_dict(old)
        assert torch.equal(fresh.tdc.lam_global, q.tdc.lam_global) and fresh.tdc.num_steps.item() == 3
        assert fresh.state_dict()["gq_config"].dtype == torch.uint8  # re-saved in the one format
    old["gq_config"] = _legacy_buffer(2**10, 8, "strided", "sobol", 42, 16, 0.5)
    with pytest.raises(ValueError, match="grouping: checkpoint 'strided' vs model 'contiguous'"):
        GaussianQuantizer(16, 2**10, 8, beta=0.5).load_state_dict(old)
    old["gq_config"] = _legacy_buffer(2**10, 8, "contiguous", "sobol", 42, 16, 1.0)
    with pytest.raises(ValueError, match="beta: checkpoint 1.0 vs model 0.5"):
        GaussianQuantizer(16, 2**10, 8, beta=0.5).load_state_dict(old)


def test_settings_validated_in_one_place():
    cfg = GQConfig(16, 2**10, 8)
    assert cfg.tdc == TDCSettings() and cfg.codebook_dim == 8 and cfg.num_codebooks == 2
    assert set(cfg.flat()) == set(GQConfig.names()) and "tolerance" in GQConfig.names()
    assert GQConfig.from_dict(cfg.flat()) == cfg  # flat round trip
    with pytest.raises(ValueError, match=r"unknown GQ setting\(s\) \['tolerence'\]"):
        GaussianQuantizer(16, 2**10, tolerence=0.3)
    with pytest.raises(ValueError, match="lam_factor must be finite and > 1"):
        GQConfig.from_dict({"dim": 4, "codebook_size": 16, "lam_factor": 1.0})
    with pytest.raises(ValueError, match="search_backend must be None, 'auto' or one of"):
        GaussianQuantizer(4, 16, search_backend="gpu")
    with pytest.raises(ValueError, match="newer than this gq-plugin"):
        GQConfig.from_dict({**cfg.to_dict(), "format": 3})
    with pytest.raises(ValueError, match="tdc_auto_step must be True or False"):
        GQConfig(4, 16, tdc_auto_step="no")
    # a ready settings object, with keyword overrides
    q = GaussianQuantizer(settings=cfg, accept_image_fmap=True, seed=7)
    assert q.settings == cfg.replace(seed=7)
    with pytest.raises(ValueError, match="disagree with settings"):
        GaussianQuantizer(8, settings=cfg)
