"""The one patch mechanism shared by every model adapter (no GQ math here).

A patch changes a model instance in three ways, all recorded in **one undo record** (a plain
dict in ``model.__dict__[UNDO_ATTR]``, so ``copy.deepcopy`` / ``pickle`` / ``torch.save(model)``
of a patched model keep working):

* ``methods``: functions bound on the instance (:class:`BoundPatch`), shadowing the class's
  methods (``encode``, ``encode_indices``, ...); the instance attributes they shadowed, if any,
  are kept in the record;
* ``attrs``: attributes set with ``setattr`` (the ``gq_quantizer`` submodule, taming's widened
  ``quant_conv``, TokenBridge's ``reconstruction_values``); their previous values, or their
  absence, are kept in the record. Modules among them are put in the host's mode
  (``train()``/``eval()``) as they are attached;
* ``data``: host values the patched methods read (TokenBridge's ``scale``).

:func:`uninstall` restores all of it exactly. Host-specific undo steps (taming copies the trained
mean back, diffusers drops its config key) run in the host's ``unpatch``, which
:func:`gq_plugin.adapters.unpatch` finds through the record's ``host`` and the host table
:data:`gq_plugin.adapters.HOSTS`.
"""

from __future__ import annotations

import functools
import inspect
import math
import types

from ..codebook import divisors

QUANTIZER_ATTR = "gq_quantizer"
UNDO_ATTR = "_gq_patch"


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


def check_weight(name: str, value) -> float:
    """``float(value)``, or ``ValueError`` naming ``name`` unless it is finite and > 0 (a loss weight
    the host multiplies the TDC loss by: zero would switch TDC off)."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} = {value!r} must be a finite number > 0: it scales the TDC loss in the host's loss "
            "(a zero weight switches TDC off)"
        )
    return value


def record(model) -> dict | None:
    """The undo record of a patched model (None if ``model`` is not patched)."""
    return getattr(model, "__dict__", {}).get(UNDO_ATTR)


def is_patched(model) -> bool:
    """True if ``model`` carries a GQ patch from :mod:`gq_plugin.adapters`."""
    return record(model) is not None


def quantizer_of(model):
    """The :class:`~gq_plugin.GaussianQuantizer` (or host quantizer module) a patch attached."""
    rec = record(model)
    if rec is None:
        raise ValueError("model is not patched with GQ")
    return getattr(model, rec["quantizer"])


def install(model, host: str, *, methods: dict | None = None, attrs: dict | None = None,
            quantizer: str = QUANTIZER_ATTR, data: dict | None = None) -> dict:
    """Patch ``model`` for ``host`` and write its undo record (returned).

    ``methods``: name -> function ``f(self, ...)`` bound on the instance; ``attrs``: name ->
    value set with ``setattr`` (``nn.Module`` registers modules and buffers); ``quantizer``: the
    attribute that holds the quantizer after patching; ``data``: host values kept in the record.
    """
    if is_patched(model):
        raise ValueError(
            f"model is already patched with GQ (host {record(model)['host']!r}); call gq_plugin.adapters.unpatch(model) first"
        )
    methods, attrs = dict(methods or {}), dict(attrs or {})
    d = model.__dict__
    rec = {
        "host": host,
        "quantizer": quantizer,
        "methods": list(methods),
        "shadowed": {n: d[n] for n in methods if n in d},
        "attrs": {n: getattr(model, n) for n in attrs if hasattr(model, n)},
        "added": [n for n in attrs if not hasattr(model, n)],
        "data": dict(data or {}),
    }
    training = getattr(model, "training", None)
    for name, value in attrs.items():
        if isinstance(training, bool) and callable(getattr(value, "train", None)) and hasattr(value, "training"):
            # a new nn.Module starts in training mode; the patched-in one follows its host's mode, so a
            # model patched (or loaded) in eval is GQ in eval at once, without a second eval() call
            value.train(training)
        setattr(model, name, value)
    for name, fn in methods.items():
        object.__setattr__(model, name, BoundPatch(fn, model))
    object.__setattr__(model, UNDO_ATTR, rec)
    return rec


def original(model, name: str):
    """The bound method ``name`` as it was before patching."""
    shadowed = model.__dict__[UNDO_ATTR]["shadowed"]
    if name in shadowed:
        return shadowed[name]
    return types.MethodType(getattr(type(model), name), model)


def data(model) -> dict:
    """The host values stored in the undo record."""
    return model.__dict__[UNDO_ATTR]["data"]


def _delete(model, name: str) -> None:
    for table in ("_modules", "_buffers", "_parameters"):
        t = getattr(model, table, None)
        if t is not None and name in t:
            del t[name]
            return
    model.__dict__.pop(name, None)


def uninstall(model, host: str | None = None):
    """Undo :func:`install`; returns the removed quantizer.

    With ``host``, refuse (``ValueError``) a model patched by another host.
    """
    rec = record(model)
    if rec is None:
        raise ValueError("model is not patched with GQ")
    if host is not None and rec["host"] != host:
        raise ValueError(f"model was patched by the {rec['host']!r} adapter, not {host!r}; use gq_plugin.adapters.unpatch(model)")
    quantizer = getattr(model, rec["quantizer"])
    for name in rec["methods"]:
        if name in rec["shadowed"]:
            object.__setattr__(model, name, rec["shadowed"][name])
        else:
            model.__dict__.pop(name, None)
    for name, value in rec["attrs"].items():
        setattr(model, name, value)
    for name in rec["added"]:
        _delete(model, name)
    del model.__dict__[UNDO_ATTR]
    return quantizer


def gq_settings_from_state_dict(state_dict, prefix: str = QUANTIZER_ATTR + ".") -> dict:
    """The patch keywords (``K``, ``m`` and the other GQ settings) stored in a checkpoint's
    ``gq_config`` entry, for plain ``state_dict`` checkpoints (ldm, TokenBridge): re-patch with
    them, then ``load_state_dict``.

    Checkpoints of gq-plugin <= 0.1 (an int64 buffer) give only ``K, m, grouping, codebook,
    seed`` (and ``beta`` once it was stored); pass changed TDC settings again for those.
    """
    from ..quantizer import GQConfig, read_config_tensor

    key = prefix + "gq_config"
    if key not in state_dict:
        raise ValueError(f"no {key!r} in the state dict (not saved from a GQ-patched model, or another prefix)")
    cfg = read_config_tensor(state_dict[key])
    if "format" in cfg:  # the one serialisation: every setting, validated
        cfg = GQConfig.from_dict(cfg).flat()
    return to_patch_kwargs(cfg)


def to_patch_kwargs(settings: dict) -> dict:
    """Flat GQ settings (:meth:`GQConfig.flat <gq_plugin.quantizer.GQConfig.flat>`) -> the keywords of a host's
    patch function: ``K``/``m`` for ``codebook_size``/``codebook_dim``; ``dim`` dropped (the
    model gives it). The one place where the adapters' K/m vocabulary meets the settings."""
    out = {"K": settings["codebook_size"], "m": settings["codebook_dim"]}
    out.update({k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                if k not in ("codebook_size", "codebook_dim", "dim", "format")})
    return out
