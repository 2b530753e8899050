"""GQAutoencoderWrapper under 2-process gloo DDP: gradients and TDC multipliers end identical on
every rank; calling ``ddp.module...encode`` directly (the pitfall) leaves gradients unsynced."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _adapter_standins import LdmAutoencoderKL
from _gloo import finish_worker
from torch.nn.parallel import DistributedDataParallel as DDP

from gq_plugin import adapters


def _model():
    torch.manual_seed(0)  # identical initial weights on every rank
    return adapters.patch_ldm_autoencoder(LdmAutoencoderKL(), K=2**6, m=2).train()


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for mode in ("wrapper", "bypass"):
        model = _model()
        ddp = DDP(adapters.GQAutoencoderWrapper(model))
        torch.manual_seed(100 + rank)  # different data per rank
        x = torch.rand(2, 3, 16, 16)
        if mode == "wrapper":
            out = ddp(x)
            loss = (out.sample - x).abs().mean() + 1e-2 * out.loss
        else:  # what `accelerator.unwrap_model(vae).encode(...)` loops do
            posterior = ddp.module.model.encode(x)
            rec = ddp.module.model.decode(posterior.sample())
            loss = (rec - x).abs().mean() + 1e-2 * posterior.kl().mean()
        loss.backward()
        torch.optim.SGD(ddp.parameters(), lr=0.0).step()  # the adapter's TDC update follows an optimizer step
        state = torch.cat([model.encoder[0].weight.grad.flatten(), torch.stack([model.gq_quantizer.tdc.lam_global])])
        gathered = [torch.zeros_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        results[mode] = torch.stack(gathered)
    if rank == 0:
        torch.save(results, out_file)
    finish_worker()


@pytest.mark.slow
def test_wrapper_syncs_gradients_and_tdc_across_ranks():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), out), nprocs=2, join=True)
        res = torch.load(out)
    wrapped, bypass = res["wrapper"], res["bypass"]
    torch.testing.assert_close(wrapped[0], wrapped[1])  # grads all-reduced, same multipliers
    assert float(wrapped[0, -1]) != 1.0  # TDC stepped (statistics all-reduced)
    assert torch.equal(bypass[0, -1], bypass[1, -1])  # TDC is synced either way ...
    assert not torch.allclose(bypass[0, :-1], bypass[1, :-1])  # ... but bypassing forward skips the grad sync
