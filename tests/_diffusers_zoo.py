"""One tiny, randomly initialised instance of every VAE class diffusers ships (test helper).

:data:`GAUSSIAN` holds, per class name, how to build a tiny instance and an input for it;
:data:`NOT_GAUSSIAN` names the classes whose ``encode`` returns no Gaussian posterior (with why).
:func:`autoencoder_classes` lists what the installed diffusers ships, so a class added in a later
release that is in neither table fails the coverage test instead of being skipped.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tiny:
    """A tiny instance of a diffusers VAE class: constructor ``kwargs``, the input ``shape``,
    ``modality`` (image / video / audio), extra ``decode`` keywords, and ``tiling`` (encode only
    works tiled)."""

    kwargs: dict
    shape: tuple
    modality: str
    decode_kwargs: dict = field(default_factory=dict)
    tiling: bool = False
    generator_decode: bool = False  # decode draws noise: pass the same seeded generator to both decodes
    axes: str = ""  # the latent axes when they are not the family's usual ones


_KL2D = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
_WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True], latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4)

GAUSSIAN: dict[str, Tiny] = {
    "AutoencoderKL": Tiny(dict(_KL2D, latent_channels=4, sample_size=16), (2, 3, 16, 16), "image"),
    "AsymmetricAutoencoderKL": Tiny(dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                         down_block_out_channels=(8, 16), up_block_out_channels=(8, 16), norm_num_groups=8,
                                         latent_channels=4), (2, 3, 16, 16), "image"),
    "AutoencoderKLFlux2": Tiny(dict(_KL2D, latent_channels=4, sample_size=16), (2, 3, 16, 16), "image"),
    "AutoencoderKLHunyuanImage": Tiny(dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                           layers_per_block=1, spatial_compression_ratio=2, sample_size=16), (2, 3, 16, 16), "image"),
    "AutoencoderKLKVAE": Tiny(dict(channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, ch_mult=(1, 2), sample_size=16),
                              (2, 3, 16, 16), "image"),
    "ConsistencyDecoderVAE": Tiny(dict(latent_channels=4, sample_size=16, encoder_block_out_channels=(8, 16),
                                       encoder_down_block_types=("DownEncoderBlock2D",) * 2, encoder_layers_per_block=1,
                                       encoder_norm_num_groups=8, decoder_block_out_channels=(8, 16),
                                       decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                       decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2, decoder_layers_per_block=1,
                                       decoder_norm_num_groups=8, decoder_num_train_timesteps=1024),
                                  (2, 3, 16, 16), "image", generator_decode=True),
    "AutoencoderKLTemporalDecoder": Tiny(dict(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32),
                                              layers_per_block=1, latent_channels=4, sample_size=16),
                                         (4, 3, 16, 16), "video (frames as a batch)", decode_kwargs={"num_frames": 2},
                                         axes="(B*F, C, H, W)"),
    "AutoencoderKLQwenImage": Tiny(dict(_WAN), (1, 3, 1, 16, 16), "image (1-frame video)"),
    "AutoencoderKLQwenImage21": Tiny(dict(_WAN, decoder_base_dim=8, in_channels=3, out_channels=3, is_residual=False),
                                     (1, 3, 1, 16, 16), "image (1-frame video)"),
    "AutoencoderKLWan": Tiny(dict(_WAN), (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLKVAEVideo": Tiny(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, temporal_compress_times=2),
                                   (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLCogVideoX": Tiny(dict(block_out_channels=(32, 32), down_block_types=("CogVideoXDownBlock3D",) * 2,
                                        up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=4, layers_per_block=1,
                                        temporal_compression_ratio=2), (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLHunyuanVideo": Tiny(dict(latent_channels=4, block_out_channels=(32, 32),
                                           down_block_types=("HunyuanVideoDownBlock3D",) * 2, up_block_types=("HunyuanVideoUpBlock3D",) * 2,
                                           layers_per_block=1, spatial_compression_ratio=2, temporal_compression_ratio=4),
                                      (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLHunyuanImageRefiner": Tiny(dict(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                                  spatial_compression_ratio=2, temporal_compression_ratio=2),
                                             (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLHunyuanVideo15": Tiny(dict(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                             spatial_compression_ratio=2, temporal_compression_ratio=2),
                                        (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLLTXVideo": Tiny(dict(latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                       down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
                                       decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
                                       decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
                                       upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=1, patch_size_t=1),
                                  (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLLTX2Video": Tiny(dict(latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8,),
                                        down_block_types=("LTX2VideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
                                        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True, False),
                                        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
                                        upsample_residual=(False,), upsample_factor=(1,), patch_size=1, patch_size_t=1,
                                        downsample_type=("spatiotemporal", "spatial")),
                                   (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLMagvit": Tiny(dict(latent_channels=4, block_out_channels=(32, 32),
                                     down_block_types=("SpatialDownBlock3D", "SpatialTemporalDownBlock3D"),
                                     up_block_types=("SpatialUpBlock3D", "SpatialTemporalUpBlock3D"), layers_per_block=1),
                                (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLMochi": Tiny(dict(in_channels=15, encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                                    latent_channels=4, layers_per_block=(1, 1, 1, 1, 1), temporal_expansions=(1, 2, 1),
                                    spatial_expansions=(2, 1, 1), add_attention_block=(False,) * 5),
                               (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLAllegro": Tiny(dict(block_out_channels=(32, 32), down_block_types=("AllegroDownBlock3D",) * 2,
                                      up_block_types=("AllegroUpBlock3D",) * 2, temporal_downsample_blocks=(True, False),
                                      temporal_upsample_blocks=(False, True), latent_channels=4, layers_per_block=1, sample_size=16,
                                      temporal_compression_ratio=2), (1, 3, 8, 16, 16), "video", tiling=True),
    "AutoencoderKLMiniMaxH3": Tiny(dict(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                        spatial_downsample_factors=(2, 1), temporal_downsample_factors=(1, 2), decoder_num_layers=1,
                                        decoder_num_attention_heads=2, decoder_attention_head_dim=8, decoder_num_register_tokens=1,
                                        clip_length=4, token_drop=0, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
                                   (1, 3, 8, 16, 16), "video"),
    "Kandinsky6SRVAE": Tiny(dict(latent_channels=4, encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
                                 layers_per_block=1, temporal_compression_ratio=2), (1, 3, 5, 16, 16), "video"),
    "AutoencoderVidTok": Tiny(dict(ch=16, ch_mult=[1, 2], z_channels=4, num_res_blocks=1), (1, 3, 5, 16, 16), "video"),
    "AutoencoderKLLTX2Audio": Tiny(dict(base_channels=16, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4, mel_bins=16),
                                   (2, 2, 16, 16), "audio (mel spectrogram)", axes="(B, C, T, F)"),
    "AutoencoderKLKVAEAudio": Tiny(dict(encoder_dim=8, encoder_rates=[2, 2], latent_dim=16, codebook_dim=4, decoder_dim=16,
                                        decoder_rates=[2, 2], attn_num_heads=2), (2, 1, 64), "audio"),
    "AutoencoderKLMiniMaxH3Audio": Tiny(dict(encoder_dim=8, encoder_rates=(2, 2), latent_dim=16, latent_channels=4,
                                             num_attention_heads=2, decoder_dim=16, decoder_rates=(2, 2), decoder_kernel_sizes=(4, 4)),
                                        (2, 1, 64), "audio"),
    "AutoencoderOobleck": Tiny(dict(encoder_hidden_size=8, downsampling_ratios=[2, 2], channel_multiples=[1, 2], decoder_channels=8,
                                    decoder_input_channels=4, audio_channels=2), (2, 2, 64), "audio"),
    "MMAudioVAE": Tiny(dict(mel_bins=16, latent_channels=4, hidden_channels=16, channel_multipliers=(1, 2), layers_per_block=1,
                            n_fft=64, hop_length=16, sample_rate=16000), (2, 1024), "audio"),
    "Cosmos3AVAEAudioTokenizer": Tiny(dict(vocoder_input_dim=4, dec_dim=8, dec_c_mults=(1, 2), dec_strides=(2, 2), enc_dim=8,
                                           enc_intermediate_dim=16, enc_num_layers=1, enc_num_blocks=1, enc_n_fft=16, enc_hop_length=4,
                                           enc_latent_dim=8, enc_c_mults=(1, 2), enc_strides=(2, 2)), (2, 2, 256), "audio"),
}


#: classes whose encode gives no Gaussian posterior, and what it gives instead
NOT_GAUSSIAN: dict[str, str] = {
    "AutoencoderKLCosmos": "refused (ValueError): its posterior is an IdentityDistribution, without a variance",
    "AutoencoderDC": "not a Gaussian VAE: encode returns deterministic latents",
    "AutoencoderTiny": "not a Gaussian VAE: encode returns deterministic latents",
    "VQModel": "not a Gaussian VAE: already a VQ model",
    "AutoencoderRAE": "not a Gaussian VAE: encode returns representation-encoder latents",
    "AutoencoderSAME": "not a Gaussian VAE: encode returns latents, no posterior",
    "RFD4ProteinaAutoencoder": "not covered: a protein-structure autoencoder whose encode returns sampled latents, no posterior",
    "LongCatAudioDiTVae": "not covered: encode returns sampled (or mean) latents; the variance never leaves the encoder",
}

#: tiny instances of NOT_GAUSSIAN classes, to check that their encode gives no variance
REFUSED: dict[str, Tiny] = {
    "AutoencoderKLCosmos": Tiny(dict(latent_channels=4, encoder_block_out_channels=(8, 16), decode_block_out_channels=(8, 16),
                                     attention_resolutions=(), resolution=16, num_layers=1, patch_size=1, spatial_compression_ratio=2,
                                     temporal_compression_ratio=1, latents_mean=None, latents_std=None), (1, 3, 3, 16, 16), "video"),
    "AutoencoderTiny": Tiny(dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                 num_decoder_blocks=(1, 1), latent_channels=4), (1, 3, 16, 16), "image"),
    "VQModel": Tiny(dict(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, num_vq_embeddings=16), (1, 3, 16, 16), "image"),
}


def diffusers_class(name: str):
    """The diffusers class called ``name`` (top level, else its autoencoders package)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        cls = dict(autoencoder_classes()).get(name)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no class {name!r}")
    return cls


def autoencoder_classes() -> list[tuple[str, type]]:
    """Every ``ModelMixin`` subclass defined in ``diffusers.models.autoencoders`` with an ``encode``
    method, sorted by name."""
    import diffusers.models.autoencoders as pkg
    from diffusers.models.modeling_utils import ModelMixin

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and issubclass(cls, ModelMixin) and callable(getattr(cls, "encode", None)):
                found[name] = cls
    return sorted(found.items())


def build(name: str, seed: int = 0):
    """``(model, x)``: a tiny randomly initialised ``name`` (from GAUSSIAN or REFUSED) in eval mode and an input for it."""
    spec = GAUSSIAN[name] if name in GAUSSIAN else REFUSED[name]
    torch.manual_seed(seed)
    model = diffusers_class(name)(**spec.kwargs).eval()
    if spec.tiling:
        model.enable_tiling()
    elif getattr(model, "use_tiling", False):  # tiling on by default (MiniMax-H3): encode_indices would warn that it
        model.disable_tiling()                 # ignores it (tested in test_diffusers_gq_loading); off, as a user is told
    x = torch.rand(*spec.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return model, x


_FAMILY_AXES = {4: "(B, C, H, W)", 5: "(B, C, T, H, W)", 3: "(B, C, T)"}


def coverage_markdown() -> str:
    """The coverage table of ``docs/diffusers_coverage.md``, measured: every class is built tiny and
    encoded here, its latent layout read off the posterior (``(B, C, T, H, W)`` = video, ...)."""
    import diffusers

    from gq_plugin.adapters._layout import LAYOUTS

    rows = []
    for name in sorted(GAUSSIAN):
        model, x = build(name)
        with torch.no_grad():
            mean = model.encode(x).latent_dist.mean
        spec = GAUSSIAN[name]
        latent = spec.axes or _FAMILY_AXES[mean.ndim]
        index_axes = latent.replace("C", "G", 1)
        rows.append(f"| `{name}` | {spec.modality} | `{latent}` | `{index_axes}` (`{LAYOUTS[mean.ndim][1]}`) | "
                    "yes: exact round trip, TDC in `kl()`, save/load |")
    for name in sorted(NOT_GAUSSIAN):
        rows.append(f"| `{name}` | | | | {NOT_GAUSSIAN[name]} |")
    return (
        "# diffusers VAE coverage\n\n"
        f"Generated by `tests/test_diffusers_all_vaes.py` (`GQ_WRITE_COVERAGE=1`) from diffusers {diffusers.__version__}: "
        "every `ModelMixin` class in `diffusers.models.autoencoders` with an `encode` method. Each class marked *yes* is "
        "patched with `gq_plugin.adapters.patch_autoencoder_kl` in a tiny randomly initialised instance and checked for "
        "`decode_indices(encode_indices(x)) == decode(encode(x).latent_dist.mode())` in eval, the TDC loss from "
        "`latent_dist.kl()` in training, and the `save_pretrained` / `load_pretrained_gq_vae` round trip. The latent "
        "layout is read off each instance's posterior. Index layouts: see `docs/diffusers_video_audio.md`.\n\n"
        "| class | modality | latent | GQ indices (token file layout) | tested |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
