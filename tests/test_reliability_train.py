"""Issue #16, training side: no code from checkpoint files, atomic checkpoints (a real training
process killed mid-write), never a non-finite checkpoint, bit-exact resume."""

import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from gq_plugin.lab.cli import main as gq_main  # noqa: E402
from gq_plugin.lab.data import PhotoDataset, ResumableSampler  # noqa: E402
from gq_plugin.lab.train import latest_checkpoint, load_training_state  # noqa: E402

from test_train_cli import MICRO_MODEL, photo_dir  # noqa: E402,F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"


def recipe(path, photos, out, steps=6, ckpt_every=2, lr=1e-3, train_encoder=True):
    cfg = {
        "name": "rel",
        "seed": 0,
        "model": {"config": MICRO_MODEL, "train_encoder": train_encoder},
        "quantizer": {"name": "gq", "codebook_size": 256, "codebook_dim": 4, "weight": 0.1},
        "loss": {"l1": 1.0, "lpips": 0.0},
        "optim": {"lr": lr},
        "train": {"steps": steps, "batch_size": 4, "log_every": 2, "ckpt_every": ckpt_every, "output_dir": str(out)},
        # ~10 train crops: an epoch ends every 2-3 steps, so resumes cross epoch boundaries;
        # random scale, crop and flip all draw randomness
        "data": {"root": str(photos), "size": 32, "resize": 64, "crops_per_image": 2, "eval_fraction": 0.3, "scale_range": [0.7, 1.0]},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photo_dir):  # noqa: F811
    """An uninterrupted 6-step run with checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("ref")
    r = recipe(d / "r.yaml", photo_dir, d / "out")
    assert gq_main(["train", str(r), "--quiet"]) == 0
    return r, d / "out"


def assert_same_weights(a_dir: Path, b_dir: Path):
    a, b = load_file(a_dir / "vae" / WEIGHTS), load_file(b_dir / "vae" / WEIGHTS)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    for k in ("lam_global", "lam_max", "lam_min", "num_steps"):  # TDC multipliers and their step count
        assert torch.equal(a[f"gq_quantizer.tdc.{k}"], b[f"gq_quantizer.tdc.{k}"]), k
    return a


# --------------------------------------------------------------------------- item 4: exact resume


def test_sampler_resumes_mid_stream_and_crops_ignore_the_global_rng(photo_dir):  # noqa: F811
    full = list(itertools.islice(iter(ResumableSampler(7, seed=3)), 40))
    tail = list(itertools.islice(iter(ResumableSampler(7, seed=3, start=11)), 29))
    assert tail == full[11:]
    for e in range(5):  # every epoch is a permutation, and epochs differ
        assert sorted(i for i, _ in full[7 * e : 7 * e + 7]) == list(range(7))
    assert [i for i, _ in full[:7]] != [i for i, _ in full[7:14]]
    ds = PhotoDataset(photo_dir, split="train", size=32, resize=64, scale_range=(0.5, 1.0), crops_per_image=2)
    torch.manual_seed(1)
    a = ds[(3, 12345)]
    torch.manual_seed(2)
    b = ds[(3, 12345)]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(3, 54321)])


def test_resume_is_bit_exact_weights_and_tdc_multipliers(reference, tmp_path):
    r, out = reference
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert gq_main(["train", str(r), f"train.output_dir={resumed}", "--resume", "latest", "--quiet"]) == 0
    state = load_training_state(resumed / "checkpoint-6")
    assert state["step"] == 6 and state["samples_seen"] == 6 * 4
    a = assert_same_weights(out / "checkpoint-6", resumed / "checkpoint-6")
    assert a["gq_quantizer.tdc.num_steps"].item() == 6


# --------------------------------------------------------------------------- item 2: torn checkpoints

KILLER = """
import io, os, signal, sys
import torch
real_save = torch.save

def save(obj, f, *args, **kwargs):
    # half of checkpoint-4's training state reaches the disk, then the process dies (SIGKILL)
    if str(f).endswith("training_state.pt") and "checkpoint-4" in str(f):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
torch.set_num_threads(int(os.environ["GQ_TEST_THREADS"]))  # the reference run's thread count: same float sums
from gq_plugin.lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_training_killed_mid_checkpoint_resumes_exactly(reference, tmp_path):
    r, out = reference
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GQ_TEST_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILLER, "train", str(r), f"train.output_dir={run}", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in run.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names  # the torn write never became checkpoint-4
    assert any(n.startswith("checkpoint-4.tmp-") for n in names)
    assert latest_checkpoint(run) == run / "checkpoint-2"
    assert gq_main(["train", str(r), f"train.output_dir={run}", "--resume", "latest", "--quiet"]) == 0
    assert_same_weights(out / "checkpoint-6", run / "checkpoint-6")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # leftover removed


def test_latest_skips_checkpoints_that_do_not_load_and_says_so(reference, tmp_path, capsys):
    _, out = reference
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-8")
    (run / "checkpoint-8" / "training_state.pt").write_bytes(b"")  # torn by an older version / a full disk
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-10")
    w = run / "checkpoint-10" / "vae" / WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert latest_checkpoint(run) == run / "checkpoint-4"
    err = capsys.readouterr().err
    assert f"skipping {run / 'checkpoint-10'} (does not load" in err
    assert f"skipping {run / 'checkpoint-8'} (does not load" in err and "EOFError" in err
    assert latest_checkpoint(tmp_path / "nothing") is None


# --------------------------------------------------------------------------- item 1: no code from files


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_resume_never_runs_code_from_a_training_state(reference, tmp_path, capsys):
    r, out = reference
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-9")
    torch.save({"step": 9, "payload": _Evil(marker)}, run / "checkpoint-9" / "training_state.pt")
    # an explicit --resume refuses it with one line, exit code 2
    assert gq_main(["train", str(r), f"train.output_dir={run}", "--resume", str(run / "checkpoint-9"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training_state.pt does not load: UnpicklingError" in err
    # 'latest' skips it and names it
    assert latest_checkpoint(run) == run / "checkpoint-4"
    assert "skipping" in capsys.readouterr().err
    assert not marker.exists()


def test_baseline_quantizer_state_is_loaded_weights_only(tmp_path):
    from gq_plugin.lab.models import load_quantizer_state

    marker = tmp_path / "pwned"
    good, evil = tmp_path / "good.pt", tmp_path / "evil.pt"
    torch.save({"codebook": torch.arange(6.0).reshape(3, 2)}, good)
    torch.save({"codebook": _Evil(marker)}, evil)
    assert torch.equal(load_quantizer_state(good)["codebook"], torch.arange(6.0).reshape(3, 2))
    with pytest.raises(ValueError, match="evil.pt does not load: UnpicklingError"):
        load_quantizer_state(evil)
    assert not marker.exists()


# --------------------------------------------------------------------------- item 3: NaN checkpoints


def test_diverging_run_fails_loudly_and_never_saves_non_finite_weights(photo_dir, tmp_path, capsys):  # noqa: F811
    # a frozen encoder keeps the posterior finite, so only the decoder blows up: nothing but the
    # checkpoint writer can notice
    r = recipe(tmp_path / "r.yaml", photo_dir, tmp_path / "out", steps=4, ckpt_every=1, lr=1e30, train_encoder=False)
    assert gq_main(["train", str(r), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "non-finite weights in" in err and "decoder" in err
    ckpts = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert [p.name for p in ckpts if ".tmp-" in p.name] == []
    for p in ckpts:  # whatever was written is finite
        assert all(torch.isfinite(t).all() for t in load_file(p / "vae" / WEIGHTS).values() if t.is_floating_point())
    last = latest_checkpoint(tmp_path / "out")
    assert last is None or load_training_state(last)["step"] < 4


def test_zero_sized_training_crops_are_refused_up_front(photo_dir, tmp_path, capsys):  # noqa: F811
    r = recipe(tmp_path / "r.yaml", photo_dir, tmp_path / "out")
    assert gq_main(["train", str(r), "data.size=0", "--quiet"]) == 2
    assert capsys.readouterr().err == "gq train: error: data.size must be >= 1, got 0\n"
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        PhotoDataset(photo_dir, split="train", size=0)
