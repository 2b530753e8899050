"""The one patch mechanism: host table, undo record, unpatch by record, copies of patched models."""

import copy
import io
import warnings

import pytest
import torch
from _adapter_standins import LdmAutoencoderKL, TamingVQModel, TokenBridgeStandin, taming_vector_quantizer2

from gq_plugin import adapters
from gq_plugin.adapters import _patch

VQ2, _ = taming_vector_quantizer2()


def _ldm():
    return adapters.patch(LdmAutoencoderKL(), "ldm", K=2**6, m=2)


def _taming():
    return adapters.patch(TamingVQModel(VQ2(64, 8, beta=0.25, sane_index_shape=True)), "taming", m=4)


def _tokenbridge():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapters.patch(TokenBridgeStandin(), "tokenbridge")


BUILD = {"ldm": _ldm, "taming": _taming, "tokenbridge": _tokenbridge}


def test_host_table_covers_every_adapter_module():
    assert sorted(adapters.HOSTS) == ["diffusers", "ldm", "sgm", "taming", "tokenbridge", "vq_pytorch"]
    for host in adapters.HOSTS.values():  # every patchable host has both halves
        assert (host.patch is None) == (host.unpatch is None)
    with pytest.raises(ValueError, match="host must be one of"):
        adapters.patch(LdmAutoencoderKL(), "nope")
    with pytest.raises(ValueError, match="drop-in class GaussianQuantize"):
        adapters.patch(LdmAutoencoderKL(), "vq_pytorch")
    with pytest.raises(ValueError, match="not an sgm AutoencodingEngine: missing 'regularization'"):
        adapters.patch(LdmAutoencoderKL(), "sgm")


@pytest.mark.parametrize("host", sorted(BUILD))
def test_one_undo_record_per_patch(host):
    model = BUILD[host]()
    rec = _patch.record(model)
    assert rec["host"] == host and adapters.is_patched(model)
    # no other GQ bookkeeping attributes on the instance
    assert [k for k in model.__dict__ if k.startswith("_gq")] == ["_gq_patch"]
    with pytest.raises(ValueError, match="already patched with GQ|already patched with GaussianVectorQuantizer"):
        adapters.patch(model, host)


@pytest.mark.parametrize("host", sorted(BUILD))
def test_unpatch_restores_the_state_dict_keys_and_returns_the_quantizer(host):
    torch.manual_seed(0)
    base = {"ldm": LdmAutoencoderKL, "taming": lambda: TamingVQModel(VQ2(64, 8, beta=0.25, sane_index_shape=True)),
            "tokenbridge": TokenBridgeStandin}[host]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters.patch(base, host, **({"K": 2**6, "m": 2} if host == "ldm" else {}))
    q = adapters.unpatch(base)
    assert q is not None and not adapters.is_patched(base)
    after = base.state_dict()
    assert sorted(after) == sorted(before)
    for k in before:  # nothing trained: every tensor is back bit for bit
        assert torch.equal(after[k], before[k]), k
    with pytest.raises(ValueError, match="not patched with GQ"):
        adapters.unpatch(base)


@pytest.mark.parametrize("host", sorted(BUILD))
def test_deepcopy_and_torch_save_keep_the_patch(host):
    model = BUILD[host]()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert _patch.record(clone)["host"] == host
        assert _patch.quantizer_of(clone) is not _patch.quantizer_of(model)
        adapters.unpatch(clone)
        assert not adapters.is_patched(clone)
    assert adapters.is_patched(model)  # the original is untouched


def test_uninstall_refuses_another_hosts_model():
    model = _ldm()
    with pytest.raises(ValueError, match="patched by the 'ldm' adapter, not 'tokenbridge'"):
        _patch.uninstall(model, "tokenbridge")
    assert adapters.is_patched(model)
