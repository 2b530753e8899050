"""Instance-level patching helpers shared by the model adapters (no GQ math here)."""

from __future__ import annotations

import functools
import inspect
import types

from ..codebook import divisors

QUANTIZER_ATTR = "gq_quantizer"
_SAVED_ATTR = "_gq_saved_attrs"


class BoundPatch:
    """A method bound to one instance, stored in its ``__dict__``.

    Unlike ``types.MethodType`` (pickled as ``getattr(obj, name)``, which fails while the object
    is being unpickled), it pickles as ``(function, instance)``, so ``torch.save(model)`` /
    ``copy.deepcopy(model)`` of a patched model work.
    """

    def __init__(self, func, obj) -> None:
        self.__func__ = func
        self.__self__ = obj
        functools.update_wrapper(self, func)
        try:
            sig = inspect.signature(func)
            self.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
        except (TypeError, ValueError):  # pragma: no cover
            pass

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (BoundPatch, (self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<GQ-patched method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


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
    # {"names": patched names, "present": instance attributes they shadowed} (no sentinel
    # objects, so copy.deepcopy / pickling of the model keep working)
    saved = {"names": list(methods), "present": {n: model.__dict__[n] for n in methods if n in model.__dict__}}
    object.__setattr__(model, _SAVED_ATTR, saved)
    setattr(model, QUANTIZER_ATTR, quantizer)  # nn.Module.__setattr__ registers it as a submodule
    for name, fn in methods.items():
        object.__setattr__(model, name, BoundPatch(fn, model))


def original(model, name: str):
    """The bound method ``name`` as it was before patching."""
    present = model.__dict__[_SAVED_ATTR]["present"]
    if name in present:
        return present[name]
    return types.MethodType(getattr(type(model), name), model)


def uninstall(model):
    """Undo :func:`install`; returns the removed quantizer."""
    if not is_patched(model):
        raise ValueError("model is not patched with GQ")
    saved = model.__dict__.pop(_SAVED_ATTR)
    for name in saved["names"]:
        if name in saved["present"]:
            object.__setattr__(model, name, saved["present"][name])
        else:
            model.__dict__.pop(name, None)
    quantizer = getattr(model, QUANTIZER_ATTR)
    modules = getattr(model, "_modules", None)
    if modules is not None and QUANTIZER_ATTR in modules:
        del modules[QUANTIZER_ATTR]
    else:
        model.__dict__.pop(QUANTIZER_ATTR, None)
    return quantizer


def gq_settings_from_state_dict(state_dict, prefix: str = QUANTIZER_ATTR + ".") -> dict:
    """Recover ``{"K", "m", "grouping", "codebook", "seed", "beta"}`` from a checkpoint's ``gq_config`` buffer.

    For plain ``state_dict`` checkpoints (ldm, TokenBridge): re-patch with these settings, then
    ``load_state_dict``. The TDC settings are not in the buffer; pass them again if you changed
    the defaults (``beta`` is missing only from checkpoints of gq-plugin before it was stored).
    """
    from ..quantizer import decode_config

    key = prefix + "gq_config"
    if key not in state_dict:
        raise ValueError(f"no {key!r} in the state dict (not saved from a GQ-patched model, or another prefix)")
    cfg = decode_config([int(v) for v in state_dict[key].reshape(-1).tolist()])
    out = {"K": cfg["codebook_size"], "m": cfg["codebook_dim"], "grouping": cfg["grouping"], "codebook": cfg["codebook"], "seed": cfg["seed"]}
    if "beta" in cfg:
        out["beta"] = cfg["beta"]
    return out
