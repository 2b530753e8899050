import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from gq_plugin.rate import (
    band_masks,
    band_statistics,
    bits_per_pixel,
    bits_per_token,
    group_rates,
    kl_bits_per_channel,
    rate_statistics,
    recommend_codebook,
)


def test_kl_bits_matches_torch_distributions():
    mu = torch.randn(100, 8, dtype=torch.float64)
    lv = torch.randn(100, 8, dtype=torch.float64)
    expected = kl_divergence(Normal(mu, (0.5 * lv).exp()), Normal(0.0, 1.0)) / math.log(2)
    torch.testing.assert_close(kl_bits_per_channel(mu, lv), expected)
    assert torch.all(kl_bits_per_channel(torch.zeros(3), torch.zeros(3)) == 0)


def test_group_rates_sum_their_channels():
    mu, lv = torch.randn(5, 16), torch.randn(5, 16)
    kl = kl_bits_per_channel(mu, lv)
    torch.testing.assert_close(group_rates(mu, lv, 4), kl.reshape(5, 4, 4).sum(-1))
    strided = group_rates(mu, lv, 4, "strided")
    torch.testing.assert_close(strided[:, 1], kl[:, [1, 5, 9, 13]].sum(-1))


def test_bits_arithmetic_sd3():
    # SD3 VAE: 16 channels, f8 -> 64 pixels per token
    assert bits_per_token(1, 2**16) == 16
    assert bits_per_pixel(1, 2**16, 64) == 0.25  # m=16
    assert bits_per_pixel(2, 2**16, 64) == 0.5  # m=8
    assert bits_per_pixel(4, 2**16, 64) == 1.0  # m=4
    with pytest.raises(ValueError, match="pixels_per_token"):
        bits_per_pixel(1, 16, 0)


def test_rate_statistics():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = rate_statistics(r, bins=3)
    assert (s.min, s.mean, s.max) == (1.0, 2.5, 4.0)
    assert s.histogram.tolist() == [1.0, 1.0, 2.0] and s.count == 4
    assert s.as_dict()["bits-mean"] == 2.5
    with pytest.raises(ValueError, match="non-finite"):
        rate_statistics(torch.tensor([1.0, float("nan")]))


def test_recommend_codebook_uniform_rates():
    # 16 channels at ~1 bit each -> m=16, K=2^16 (the SD3 0.25 bpp configuration)
    rates = torch.full((1000, 16), 1.0) + 0.01 * torch.rand(1000, 16)
    rec = recommend_codebook(rates)
    # mean group rate 16.08 bits -> the smallest covering codebook is 2^17
    assert (rec.codebook_dim, rec.codebook_size) == (16, 2**17)
    rates = torch.full((1000, 16), 0.99)
    rec = recommend_codebook(rates)
    assert (rec.codebook_dim, rec.codebook_size) == (16, 2**16)
    assert rec.chosen.frac_over_budget == 0.0 and "convert directly" in rec.reasoning
    assert "and has the largest m" in rec.reasoning
    assert "| 16 **(chosen)** | 16 |" in rec.table()


def test_recommend_codebook_caps_k_and_prefers_lossless_split():
    # 4 bits per channel on 16 channels: m=16 would need K=2^64; the cap (18) forces smaller m.
    rates = torch.full((500, 16), 4.0)
    rec = recommend_codebook(rates, max_log2_codebook_size=16)
    assert rec.codebook_dim == 4 and rec.codebook_size == 2**16
    assert rec.chosen.mean_excess_bits == 0.0
    m16 = [o for o in rec.options if o.codebook_dim == 16][0]
    assert m16.mean_excess_bits == pytest.approx(64 - 16)
    assert "fine-tune" not in rec.reasoning
    # m=4 was picked because m=8 loses bits (K capped at 2^16 for 32 bits/group), not for being the largest m
    assert "largest m" not in rec.reasoning
    assert "larger m lose more (m=8, K=2^16: 32.000 bits/token)" in rec.reasoning


def test_recommend_codebook_bad_input():
    with pytest.raises(ValueError, match="channel_rates"):
        recommend_codebook(torch.zeros(10))


def test_band_statistics_exact_shares_and_quantiles():
    # T = 10, alpha = 0.5: band [9.5, 10.5]; edges count as in band
    r = torch.tensor([[9.0, 9.5, 10.0, 10.5], [10.75, 12.0, 8.0, 10.25]], dtype=torch.float64)
    s = band_statistics(r, target_bits=10.0, tolerance=0.5, quantiles=(0.0, 0.5, 1.0))
    assert s.count == 8
    assert (s.in_band, s.over_budget, s.under_budget) == (4 / 8, 2 / 8, 2 / 8)
    assert s.mean_excess == pytest.approx((0.25 + 1.5) / 8)
    assert s.quantiles == {0.0: 8.0, 0.5: 10.125, 1.0: 12.0}
    assert (s.min, s.max, s.mean) == (8.0, 12.0, pytest.approx(80.0 / 8))
    d = s.as_dict()
    assert d["band-over"] == 0.25 and d["bits-q50"] == 10.125 and d["bits-q100"] == 12.0
    assert s.to_json()["quantiles"]["q50"] == 10.125
    t = s.table().splitlines()
    assert t[0].startswith("| group rates (bits) | in band | over budget | under budget | mean | q00 | q50 | q100 | max |")
    assert t[2] == "| 8 rates, band 9.5-10.5 | 50.0% | 25.0% | 25.0% | 10.00 | 8.00 | 10.12 | 12.00 | 12.00 |"


def test_band_statistics_default_quantiles_match_numpy_and_torch():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(1000, generator=g, dtype=torch.float64) * 20
    s = band_statistics(r, 10.0)
    expected = torch.quantile(r, torch.tensor([0.01, 0.05, 0.5, 0.95, 0.99], dtype=torch.float64))
    assert list(s.quantiles.values()) == pytest.approx(expected.tolist(), abs=1e-12)
    over, under = band_masks(r, 10.0, 0.5)
    assert s.over_budget == over.double().mean().item() and s.under_budget == under.double().mean().item()
    assert s.in_band + s.over_budget + s.under_budget == pytest.approx(1.0)


def test_band_statistics_bad_input():
    with pytest.raises(ValueError, match="empty"):
        band_statistics(torch.zeros(0), 4.0)
    with pytest.raises(ValueError, match="non-finite"):
        band_statistics(torch.tensor([1.0, float("inf")]), 4.0)
    with pytest.raises(ValueError, match="tolerance"):
        band_statistics(torch.tensor([1.0]), 4.0, tolerance=-1.0)
    with pytest.raises(ValueError, match="quantiles"):
        band_statistics(torch.tensor([1.0]), 4.0, quantiles=(1.5,))
    with pytest.raises(ValueError, match="target_bits"):
        band_statistics(torch.tensor([1.0]), float("nan"))
