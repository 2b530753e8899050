"""The GQ swap on TokenBridge's real model class (issue #12 item 6), when a checkout is available.

TokenBridge is not on PyPI. Point ``TOKENBRIDGE_SRC`` at a checkout of
https://github.com/YuqingWang1029/TokenBridge (matched: 3ede2818251c7b47427c470e07da9409afd66f71)
to run these tests; they are skipped otherwise. ``models/tokenbridge.py`` imports two timm
layers (``Mlp``, ``vision_transformer.Block``); timm drags in torchvision, so a small stand-in
for those two layers is injected instead (written here, not timm's code). TokenBridge calls
``.cuda()`` unconditionally in a few places; on a CPU-only machine ``Tensor.cuda`` is made a
no-op for the test.
"""

import importlib.util
import math
import os
import sys
import types

import pytest
import torch
from torch import nn

SRC = os.environ.get("TOKENBRIDGE_SRC")
pytestmark = pytest.mark.skipif(not SRC or not os.path.isfile(os.path.join(SRC or "", "models", "tokenbridge.py")),
                                reason="set TOKENBRIDGE_SRC to a TokenBridge checkout")


class _Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU, drop=0.0, **_):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features or in_features), act_layer(), nn.Linear(hidden_features or in_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm, proj_drop=0.0, attn_drop=0.0, **_):
        super().__init__()
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@pytest.fixture()
def tokenbridge_module(monkeypatch):
    timm = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    layers.Mlp = _Mlp
    models = types.ModuleType("timm.models")
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.Block = _Block
    for name, mod in {"timm": timm, "timm.layers": layers, "timm.models": models, "timm.models.vision_transformer": vit}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    spec = importlib.util.spec_from_file_location("tokenbridge_upstream", os.path.join(SRC, "models", "tokenbridge.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(mod, **kw):
    torch.manual_seed(0)
    return mod.TokenBridge(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, channel_embed_dim=16, channel_depth=1,
                           channel_heads=2, quant_levels=64, vae_embed_dim=16, buffer_size=2, class_num=10, **kw)


def _x(b=2):
    from gq_plugin import adapters

    return adapters.tokenbridge_gq_inputs(mean=torch.randn(b, 16, 4, 4), logvar=torch.full((b, 16, 4, 4), -3.0))


def test_real_forward_with_m4_fails_without_the_rebuilt_head(tokenbridge_module):
    from gq_plugin import adapters

    model = _tiny(tokenbridge_module)
    adapters.swap_tokenbridge_quantizer(model, K=2**8, m=4, ar_head="gq", search_backend="torch")
    # TokenBridge's own forward (unbound from the class) is the reported failure
    with pytest.raises(IndexError, match="out of bounds"):
        type(model).forward(model, _x(), torch.tensor([0, 1]))


@pytest.mark.parametrize("m,K", [(4, 2**8), (16, 2**16)])
def test_real_model_trains_and_samples_with_m_gt_1(tokenbridge_module, m, K):
    from gq_plugin import adapters

    model = _tiny(tokenbridge_module)
    adapters.swap_tokenbridge_quantizer(model, K=K, m=m, search_backend="torch")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(2):
        loss = model(_x(), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and abs(float(loss.detach()) - math.log(K)) < 0.35 * math.log(K)
    model.eval()
    out = model.sample_tokens(2, num_iter=2, cfg=1.5, labels=torch.tensor([3, 4]), temperature=1.0)
    assert out.shape == (2, 16, 4, 4)
    torch.testing.assert_close(model.patchify(out), model.dequantize_tokens(model.gq_last_tokens))
    fresh = _tiny(tokenbridge_module)
    adapters.swap_tokenbridge_quantizer(fresh, K=K, m=m, search_backend="torch")
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_real_original_checkpoint_keeps_the_gq_table(tokenbridge_module):
    from gq_plugin import adapters

    original = _tiny(tokenbridge_module).state_dict()
    model = _tiny(tokenbridge_module)
    adapters.swap_tokenbridge_quantizer(model, m=1, search_backend="torch")  # like for like: TokenBridge's head kept
    table = model.reconstruction_values.clone()
    with pytest.warns(UserWarning, match="kept the GQ reconstruction_values"):
        model.load_state_dict(original, strict=False)
    assert torch.equal(model.reconstruction_values, table)
    model.eval()
    out = model.sample_tokens(1, num_iter=2)  # TokenBridge's own sampler
    z = (out / 0.2325).reshape(-1, 1)
    assert float((z - model.gq_quantizer.codebook[:, 0]).abs().min(1).values.max()) < 1e-5
    loss = model(_x(), torch.tensor([0, 1]))  # TokenBridge's own forward with the GQ quantizer
    assert torch.isfinite(loss)
    m4 = _tiny(tokenbridge_module)
    adapters.swap_tokenbridge_quantizer(m4, K=2**8, m=4, search_backend="torch")
    with pytest.warns(UserWarning, match="train it"):
        report = adapters.load_tokenbridge_checkpoint(m4, original)
    assert any(k.startswith("channel_blocks.") for k in report["left_out"])
