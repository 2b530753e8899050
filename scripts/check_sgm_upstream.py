"""Local check, not run by CI (sgm is not on PyPI): the GQ regularizer inside the *real* sgm
``AutoencodingEngine.training_step`` (Lightning 1.9.5 Trainer), ``DiagonalGaussianRegularizer``
replaced by ``adapters.patch(engine, "sgm")``, and the real ``AEIntegerWrapper``.

    python scripts/check_sgm_upstream.py /path/to/generative-models   # checked at 0ad7de9

It imports sgm's autoencoder modules from that checkout without running sgm's package
``__init__`` files (they import the diffusion stack: open_clip, transformers, ...). The loss is
tests/_hosts.SgmLoss (GeneralLPIPSWithDiscriminator's contract without LPIPS, which needs
torchvision).
"""
import os
import sys
import types
import warnings

warnings.simplefilter("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
src = os.path.join(sys.argv[1], "sgm")
for name, path in (("sgm", src), ("sgm.models", os.path.join(src, "models")), ("sgm.modules", os.path.join(src, "modules"))):
    mod = types.ModuleType(name); mod.__path__ = [path]; sys.modules[name] = mod  # skip the heavy package __init__s
import sgm.models.autoencoder as ae
import torch
from _hosts import fit, steps_between

import gq_plugin.adapters.sgm as gsgm
from gq_plugin import adapters

print("sgm base class in use:", gsgm._Base)
dd = dict(double_z=True, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="vanilla")
def engine(reg_params):
    e = ae.AutoencodingEngine(
        encoder_config={"target": "sgm.modules.diffusionmodules.model.Encoder", "params": dd},
        decoder_config={"target": "sgm.modules.diffusionmodules.model.Decoder", "params": dd},
        loss_config={"target": "_hosts.SgmLoss", "params": {"regularization_weights": {"kl_loss": 1e-6}}},
        regularizer_config={"target": "gq_plugin.adapters.sgm.GaussianQuantRegularizer", "params": reg_params},
        input_key="jpg")
    e.learning_rate = 1e-3
    return e
torch.manual_seed(0)
e = engine({"dim": 4, "codebook_size": 64, "codebook_dim": 2})
tdc = e.regularization.gq.tdc
log = fit(e, tdc, batches=4, key="jpg", channel_last=False)
print("real AutoencodingEngine.training_step (optimizer idx, TDC moves):", steps_between(log, int(tdc.num_steps)), "num_steps", int(tdc.num_steps))
old = engine({"dim": 4, "codebook_size": 64, "codebook_dim": 2, "tdc_auto_step": True})  # the pre-fix rule: every training forward
tdc_old = old.regularization.gq.tdc
log = fit(old, tdc_old, batches=4, key="jpg", channel_last=False)
print("  same with tdc_auto_step=True (step on every forward):", steps_between(log, int(tdc_old.num_steps)))
# patch route on the real engine: bind regularization_weights
e2 = engine({"dim": 4, "codebook_size": 64})
e2.regularization = __import__("sgm.modules.autoencoding.regularizers", fromlist=["x"]).DiagonalGaussianRegularizer()
adapters.patch(e2, "sgm", K=64, m=2, tdc_weight=0.5)
x = torch.rand(2, 3, 8, 8) * 2 - 1
_, rl = e2.encode(x, return_reg_log=True)
print("patched: 1e-6 * kl_loss =", float(1e-6 * rl["kl_loss"]), " 0.5 * tdc_loss =", float(0.5 * rl["tdc_loss"]))
for m, shape in ((4, (4, 4)), (2, (4, 4)), (1, (4, 4))):
    e3 = engine({"dim": 4, "codebook_size": 64, "codebook_dim": m}).eval()
    w = ae.AEIntegerWrapper(e3, shape=shape).eval()
    with torch.no_grad():
        inds = w.encode(x); dec = w.decode(inds); ref = e3.decode(e3.encode(x))
    print(f"real AEIntegerWrapper m={m} (G={4//m}): inds {tuple(inds.shape)} decode==decode(encode): {torch.equal(dec, ref)}")
e4 = engine({"dim": 4, "codebook_size": 2**16, "codebook_dim": 1}).eval()
with torch.no_grad():
    inds = ae.AEIntegerWrapper(e4, shape=(4, 16)).eval().encode(x); dec = ae.AEIntegerWrapper(e4, shape=(4, 16)).eval().decode(inds)
print("real AEIntegerWrapper K=2^16 G=4 grouped, shape=(h, w*G):", tuple(inds.shape), torch.equal(dec, e4.decode(e4.encode(x))))
