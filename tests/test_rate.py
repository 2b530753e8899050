import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from gq_plugin.rate import (
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
