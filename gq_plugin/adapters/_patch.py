"""Instance-level patching helpers shared by the model adapters (no GQ math here)."""

from __future__ import annotations

import types

from ..codebook import divisors

QUANTIZER_ATTR = "gq_quantizer"
_SAVED_ATTR = "_gq_saved_attrs"
_MISSING = object()


def check_codebook_dim(latent_channels: int, m: int) -> None:
    """``ValueError`` listing the valid ``m`` when ``m`` does not divide ``latent_channels``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or latent_channels % m != 0:
        raise ValueError(
            f"m (channels per sub-codebook) = {m!r} must be a positive divisor of the model's "
            f"latent channels ({latent_channels}); valid m: {divisors(latent_channels)}"
        )


def is_patched(model) -> bool:
    """True if ``model`` carries a GQ patch from :mod:`gq_plugin.adapters`."""
    return _SAVED_ATTR in getattr(model, "__dict__", {})


def install(model, quantizer, methods: dict) -> None:
    """Attach ``quantizer`` as ``model.gq_quantizer`` and bind ``methods`` on the instance.

    The previous instance attributes (if any) are remembered so :func:`uninstall` restores
    the model exactly.
    """
    if is_patched(model):
        raise ValueError("model is already patched with GQ; call gq_plugin.adapters.unpatch(model) first")
    saved = {name: model.__dict__.get(name, _MISSING) for name in methods}
    object.__setattr__(model, _SAVED_ATTR, saved)
    setattr(model, QUANTIZER_ATTR, quantizer)  # nn.Module.__setattr__ registers it as a submodule
    for name, fn in methods.items():
        object.__setattr__(model, name, types.MethodType(fn, model))


def original(model, name: str):
    """The bound method ``name`` as it was before patching."""
    saved = model.__dict__[_SAVED_ATTR].get(name, _MISSING)
    if saved is not _MISSING:
        return saved
    return types.MethodType(getattr(type(model), name), model)


def uninstall(model):
    """Undo :func:`install`; returns the removed quantizer."""
    if not is_patched(model):
        raise ValueError("model is not patched with GQ")
    saved = model.__dict__.pop(_SAVED_ATTR)
    for name, value in saved.items():
        if value is _MISSING:
            model.__dict__.pop(name, None)
        else:
            object.__setattr__(model, name, value)
    quantizer = getattr(model, QUANTIZER_ATTR)
    modules = getattr(model, "_modules", None)
    if modules is not None and QUANTIZER_ATTR in modules:
        del modules[QUANTIZER_ATTR]
    else:
        model.__dict__.pop(QUANTIZER_ATTR, None)
    return quantizer
