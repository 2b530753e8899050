"""``gq prior sample RUN --n N --out DIR``: draw index maps from a trained prior and decode them.

The images are decoded by the tokenizer recorded with the training tokens (``model_dir`` in their
``gq tokenize`` manifest) or by ``tokenizer=`` / ``--tokenizer MODEL``; a tokenizer whose codebook or
weights differ from the tokens' is refused before anything is sampled. DIR receives
``sample-0000.png`` ... , ``grid.png`` (up to 64 samples in full rows of 8) and ``samples.gqt`` (the sampled
indices as a token file of that tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .layout import TokenLayout


@torch.no_grad()
def generate_indices(prior: torch.nn.Module, layout: TokenLayout, n: int, batch_size: int = 16, temperature: float = 1.0,
                     top_k: int | None = None, generator_seed: int = 0, progress: bool = True) -> torch.Tensor:
    """``n`` index maps ``(n, G, h, w)`` sampled from ``prior`` (x-transformers ``generate``, KV cache,
    ``temperature``; ``top_k`` keeps the k most likely codes, None samples the full distribution)."""
    from tqdm.auto import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= layout.codebook_size:
        raise ValueError(f"top_k must lie in [1, {layout.codebook_size}], got {top_k}")
    dev = next(prior.parameters()).device
    torch.manual_seed(generator_seed)
    out = []
    for s in tqdm(range(0, n, batch_size), desc="sample", unit="batch", disable=not progress, dynamic_ncols=True):
        b = min(batch_size, n - s)
        prompt = torch.full((b, 1), layout.bos, dtype=torch.long, device=dev)
        if top_k is None:
            toks = prior.generate(prompt, layout.num_tokens, temperature=temperature, filter_logits_fn=lambda t, **kw: t)
        else:
            toks = prior.generate(prompt, layout.num_tokens, temperature=temperature, filter_logits_fn="top_k", filter_kwargs={"k": top_k})
        out.append(layout.to_indices(toks.cpu()))
    return torch.cat(out)


def sample(run, n: int, out_dir, tokenizer=None, batch_size: int = 16, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, device=None, progress: bool = True) -> dict:
    """Sample ``n`` images from the prior in ``run`` into ``out_dir``. Returns ``paths`` (PNGs),
    ``grid``, ``tokens`` (the ``.gqt`` file), ``indices`` ``(n, G, h, w)`` and ``images`` ``(n, 3, H, W)``
    in [-1, 1]."""
    from ...tokens import save_tokens
    from ..plots import save_grid, save_image
    from ..tokenizer import load_tokenizer
    from .train import load_prior

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prior, layout, info = load_prior(run, device)
    tokens = info["tokens"]
    model_dir = tokenizer or tokens.get("model_dir")
    if not model_dir:
        raise ValueError(f"the tokens of {str(run)!r} record no tokenizer (made by an older `gq tokenize`); pass --tokenizer MODEL")
    tok = load_tokenizer(model_dir, "--tokenizer" if tokenizer else "the tokens' model_dir")
    tok.check_tokens(tokens, what=f"the tokens the prior in {str(run)!r} was trained on")
    tok.to(device)
    indices = generate_indices(prior, layout, n, batch_size, temperature, top_k, seed, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = torch.cat([tok.decode(indices[s : s + batch_size]).cpu() for s in range(0, n, batch_size)])
    paths = [str(save_image(images[i], out / f"sample-{i:04d}.png")) for i in range(n)]
    per_row = min(8, n)
    shown = images[: min(64, n // per_row * per_row)]
    grid = save_grid({f"#{r}": shown[r : r + per_row] for r in range(0, len(shown), per_row)}, out / "grid.png")
    h, w = images.shape[-2:]
    tokfile = out / "samples.gqt"
    save_tokens(tokfile, indices, tok.header(tuple(indices.shape), (h, w), {"prior": str(Path(run).resolve()), "seed": seed,
                                                                            "temperature": temperature, "top_k": top_k}))
    return {"paths": paths, "grid": str(grid), "tokens": str(tokfile), "indices": indices, "images": images}


__all__ = ["generate_indices", "sample"]
