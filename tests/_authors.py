"""The paper authors' UNet tokenizer layout (``tongdaxu/VQ-VAE-from-Gaussian-VAE``), built from real
classes, and their GQ formulas written out independently, for tests/test_authors_checkpoint.py.

* The network: their ``pit.modules.unet.Encoder``/``Decoder`` are Stable Diffusion's LDM
  ``Encoder``/``Decoder`` with the mid-block attention commented out. The pip-installed ``ldm``
  package (stable-diffusion-sdkit) has the same classes; :func:`authors_unet` builds them and
  removes ``mid.attn_1`` (so the state dict has no ``mid.attn_1.*`` keys and ``forward`` skips it).
* The config: :func:`authors_yaml` writes the ``model`` section of their ``configs/sd3unet_gq_*.yaml``
  (written here from their published values, not copied), the decoder's params by OmegaConf
  interpolation of the encoder's, as theirs are.
* The formulas (from their repository's regularizer): codebook = scipy
  ``norm.ppf`` of a scrambled Sobol draw (``SobolEngine(m, scramble=True, seed=42)``); sub-codebook
  ``j`` of a token owns channels ``j, j + C/m, j + 2C/m, ...``; the index maximises
  ``-sum(((c - mu) / sigma)^2) + beta * sum(c^2)`` with ``logvar`` clamped to [-30, 20].
"""

from __future__ import annotations

import functools

import torch
from torch import nn

SMALL = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], resolution=32, z_channels=16)
#: the released UNet tokenizers: configs/sd3unet_gq_{0.25,0.50,1.00}.yaml
RELEASED = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[32], resolution=256, z_channels=16)
BPP_GROUP = {0.25: 16, 0.50: 8, 1.00: 4}

_YAML = """\
model:
  base_learning_rate: 1e-4
  target: pit.models.autoencoder.AutoencodingEngine
  params:
    input_key: img
{engine_extra}    loss_config:
      target: pit.modules.losses.discriminator_loss.GeneralLPIPSWithDiscriminator
      params:
        perceptual_weight: 1.0
        regularization_weights:
          kl_loss: 0.1
    regularizer_config:
      target: {regularizer}
      params:
{reg_params}
    encoder_config:
      target: {encoder}
      params:
{unet_params}
    decoder_config:
      target: {decoder}
      params: ${{model.params.encoder_config.params}}
"""


def _yaml_block(d: dict, indent: int) -> str:
    return "".join(f"{' ' * indent}{k}: {list(v) if isinstance(v, (list, tuple)) else v}\n" for k, v in d.items()).rstrip("\n")


def authors_yaml(unet: dict = SMALL, group: int = 16, n_samples: int = 65536, *, regularizer="pit.quantization.gaussian.GaussianQuantRegularizer",
                 reg_extra: dict | None = None, encoder="pit.modules.unet.Encoder", decoder="pit.modules.unet.Decoder",
                 engine_extra: dict | None = None) -> str:
    """The authors' config text for a UNet GQ tokenizer (defaults: a small UNet, m=16, K=2^16)."""
    reg = {"format": "bchw", "group": group, "n_samples": n_samples, "backend": "cuda", **(reg_extra or {})}
    params = {"attn_type": "vanilla", "double_z": "true", "in_channels": 3, "out_ch": 3, "dropout": 0.0, **unet}
    return _YAML.format(engine_extra=_yaml_block(engine_extra, 4) + "\n" if engine_extra else "", regularizer=regularizer,
                        reg_params=_yaml_block(reg, 8), encoder=encoder, unet_params=_yaml_block(params, 8), decoder=decoder)


def authors_unet(unet: dict = SMALL, seed: int = 0, device=None) -> tuple[nn.Module, nn.Module]:
    """Their Encoder/Decoder: ldm's, mid-block attention removed; random init, GroupNorm affine
    parameters perturbed (so a norm1/norm2 or q/k mix-up in a conversion cannot go unseen)."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    params = dict(unet, in_channels=3, out_ch=3, double_z=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.device(device or "cpu"):
        torch.manual_seed(seed)
        enc, dec = Encoder(**params), Decoder(**params)
    for net in (enc, dec):
        del net.mid.attn_1
        net.mid.attn_1 = nn.Identity()  # what their commented-out line leaves: no weights, no op
        if device != "meta":
            for mod in net.modules():
                if isinstance(mod, nn.GroupNorm):
                    with torch.no_grad():
                        mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=gen))
                        mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen))
    return enc.eval(), dec.eval()


def lightning_state(enc: nn.Module, dec: nn.Module) -> dict:
    """The ``state_dict`` of their engine: ``encoder.*``, ``decoder.*`` and a few ``loss.*`` entries
    (the learned logvar, LPIPS and discriminator weights of their training loss)."""
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    state.update({"loss.logvar": torch.zeros(()), "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1),
                  "loss.discriminator.main.0.weight": torch.randn(160, 3, 4, 4), "loss.discriminator.main.0.bias": torch.zeros(160)})
    return state


def lightning_checkpoint(state: dict) -> dict:
    """A Lightning 2.x checkpoint around ``state`` (what ``Trainer.save_checkpoint`` writes for their engine)."""
    return {"epoch": 3, "global_step": 40000, "pytorch-lightning_version": "2.2.2", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {"ModelCheckpoint{'every_n_train_steps': 5000}": {"best_model_score": None, "dirpath": "/logs/checkpoints"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}],
            "lr_schedulers": []}


@functools.lru_cache(maxsize=4)
def authors_codebook(K: int, m: int, seed: int = 42) -> torch.Tensor:
    """Their codebook recipe: scipy's inverse normal CDF of a scrambled Sobol draw, cast to float32
    (cached: treat it as read-only)."""
    from scipy.stats import norm

    u = torch.quasirandom.SobolEngine(m, scramble=True, seed=seed).draw(K)
    return torch.from_numpy(norm.ppf(u.numpy())).float()


def authors_gq(moments: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0):
    """Their eval-mode GQ of ``(B, 2C, h, w)`` moments, scores in float64: ``(indices (B, C/m, h, w),
    z_hat (B, C, h, w), scores (rows, K))`` with the strided channel map (rows in (b, h, w, j) order)."""
    b, c2, h, w = moments.shape
    c, m = c2 // 2, codebook.shape[1]
    ncb = c // m
    tokens = moments.double().permute(0, 2, 3, 1).reshape(b, h * w, c2)
    mu, logvar = tokens.chunk(2, dim=2)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    mu = mu.reshape(b, h * w, m, ncb).permute(0, 1, 3, 2).reshape(-1, m)
    std = std.reshape(b, h * w, m, ncb).permute(0, 1, 3, 2).reshape(-1, m)
    cb = codebook.double()
    step = max(1, 2**22 // cb.numel())
    scores = torch.cat([-(((cb[None] - mu[i:i + step, None]) / std[i:i + step, None]) ** 2).sum(-1) + beta * (cb**2).sum(-1)[None]
                        for i in range(0, mu.shape[0], step)])
    indices = scores.argmax(dim=1).reshape(b, h, w, ncb).permute(0, 3, 1, 2)
    return indices, authors_dequant(indices, codebook), scores


def authors_dequant(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Their ``dequant``: ``(B, C/m, h, w)`` indices -> the ``(B, C, h, w)`` latent, channel
    ``i * (C/m) + j`` = coordinate ``i`` of sub-codebook ``j``'s codeword."""
    b, ncb, h, w = indices.shape
    m = codebook.shape[1]
    z = codebook[indices.permute(0, 2, 3, 1).reshape(-1)].reshape(b, h * w, ncb, m)
    return z.permute(0, 1, 3, 2).reshape(b, h, w, m * ncb).permute(0, 3, 1, 2)
