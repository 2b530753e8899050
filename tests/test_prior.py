"""``gq prior``: token layout, baseline decoding, the tokenizer interface, train / resume / sample end to end
on real token files of tiny tokenizers trained by ``gq train`` (GQ and VQ), and one-line errors for bad input."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("x_transformers")
PIL = pytest.importorskip("PIL.Image")

from gq_plugin.lab.cli import main as gq_main  # noqa: E402
from gq_plugin.lab.prior import TokenLayout, build_prior, evaluate_nll, load_prior, load_prior_config  # noqa: E402
from gq_plugin.lab.tokenizer import BaselineTokenizer, GQTokenizer, load_tokenizer  # noqa: E402
from gq_plugin.tokens import load_tokens  # noqa: E402

from _tokenizers import small_photos, train_tokenizer  # noqa: E402

SIZE = 16  # 8 x 8 token grid at the micro model's factor 2
PRIOR = ["model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "train.batch_size=4", "train.log_every=1"]


# --------------------------------------------------------------------------- layout and decoding (no training)


def test_layout_is_position_major_code_minor_and_round_trips():
    layout = TokenLayout(10, (2, 2, 3))
    idx = torch.arange(12).reshape(1, 2, 2, 3) % 10  # code g at (y, x) = (g * 6 + y * 3 + x) % 10
    seq = layout.to_sequence(idx)
    assert seq.shape == (1, 13) and seq[0, 0] == 10  # BOS = K
    expected = [idx[0, g, y, x].item() for y in range(2) for x in range(3) for g in range(2)]
    assert seq[0, 1:].tolist() == expected
    assert torch.equal(layout.to_indices(seq[:, 1:]), idx)
    with pytest.raises(ValueError, match=r"do not match the prior's token shape \(2, 2, 3\)"):
        layout.to_sequence(torch.zeros(1, 1, 2, 3, dtype=torch.long))


def test_prior_never_predicts_bos_and_nll_is_the_summed_cross_entropy():
    layout = TokenLayout(7, (2, 2, 2))
    torch.manual_seed(0)
    prior = build_prior(layout, load_prior_config(None, ["model.dim=16", "model.depth=1", "model.heads=2", "model.dim_head=8"]).model).eval()
    seqs = layout.to_sequence(torch.randint(0, 7, (3, 2, 2, 2)))
    logits = prior.net(seqs[:, :-1])
    assert logits.shape == (3, 8, 7)  # K logits: the BOS (index 7) cannot be sampled
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, seqs[:, 1:, None]).squeeze(-1).sum(1) / math.log(2)
    res = evaluate_nll(prior, seqs, layout, batch_size=2)
    assert res["bits_per_image"] == pytest.approx(ref.mean().item(), rel=1e-5)
    assert res["bits_per_token"] == pytest.approx(ref.mean().item() / 8, rel=1e-5)
    # AutoregressiveWrapper's own training loss is the same quantity, in nats per token
    assert prior(seqs).item() * 8 / math.log(2) == pytest.approx(ref.mean().item(), rel=1e-4)


@pytest.mark.parametrize("name, kw", [("vq", {"codebook_size": 32}), ("fsq", {"levels": [8, 5, 5]}), ("lfq", {"codebook_size": 64}),
                                      ("bsq", {"codebook_size": 64}), ("tokenbridge", {"bits": 2})])
def test_baselines_decode_their_indices_to_their_quantized_latent(name, kw):
    from gq_plugin.lab.registry import build_quantizer

    torch.manual_seed(0)
    q = build_quantizer(name, 6, **kw)
    z = torch.randn(2, 6, 5, 4)
    q.train()
    q(z)  # k-means init / statistics
    q.eval()
    zq, idx, _ = q(z)
    assert torch.equal(q.decode_indices(idx), zq)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in model: \['width'\]"):
        load_prior_config(None, ["model.width=3"])
    with pytest.raises(ValueError, match=r"train.steps must be an int >= 1, got 0"):
        load_prior_config(None, ["train.steps=0"])
    with pytest.raises(ValueError, match="is not key=value"):
        load_prior_config(None, ["train.steps"])


# --------------------------------------------------------------------------- real tokenizers from `gq train`


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    if small_photos(d) < 8:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    return d


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, photos):
    """A GQ (K=256, m=2: G=2 codes per position) and a VQ (K=64) tokenizer, 2 training steps each,
    and their `gq tokenize` folders of the photos (train: all 10, held-out: the first 4)."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for q in ({"name": "gq", "codebook_size": 256, "codebook_dim": 2}, {"name": "vq", "codebook_size": 64}):
        model = train_tokenizer(root / f"run-{q['name']}", photos, q)
        tok = root / f"tokens-{q['name']}"
        assert gq_main(["tokenize", str(model), str(photos), "--out", str(tok), "--size", str(SIZE), "--workers", "0", "--quiet"]) == 0
        held = root / f"held-{q['name']}"
        held_src = root / "held-photos"
        if not held_src.is_dir():
            held_src.mkdir()
            for p in sorted(photos.iterdir())[:4]:
                shutil.copy(p, held_src / p.name)
        assert gq_main(["tokenize", str(model), str(held_src), "--out", str(held), "--size", str(SIZE), "--workers", "0", "--quiet"]) == 0
        out[q["name"]] = {"model": model, "tokens": tok, "held": held}
    return out


def test_tokenizer_interface_matches_the_training_path(tokenizers, photos):
    """GQ: encode_indices of the patched VAE; VQ: the bottleneck's indices of the posterior mean; decode
    gives the wrapper's eval reconstruction; the manifests carry each codebook."""
    from gq_plugin.lab.codec import load_image
    from gq_plugin.lab.models import build_model

    x = torch.stack([load_image(p, SIZE, 2) for p in sorted(photos.iterdir())[:3]])
    gq = load_tokenizer(tokenizers["gq"]["model"])
    assert isinstance(gq, GQTokenizer) and gq.groups == 2 and gq.codebook_size == 256
    with torch.no_grad():
        assert torch.equal(gq.encode(x), gq.vae.encode_indices(x))
    vq = load_tokenizer(tokenizers["vq"]["model"])
    assert isinstance(vq, BaselineTokenizer) and vq.kind == "vq" and vq.groups == 1 and vq.codebook_size == 64
    cfg = yaml.safe_load((tokenizers["vq"]["model"].resolve().parent / "config.yaml").read_text())
    cfg["model"]["pretrained"] = str(tokenizers["vq"]["model"] / "vae")
    _, wrapper = build_model(cfg)
    with torch.no_grad():
        out = wrapper.eval()(x)
        idx = vq.encode(x)
        assert idx.shape == (3, 1, 8, 8) and torch.equal(idx[:, 0], out.indices)
        assert torch.allclose(vq.decode(idx), out.sample.clamp(-1, 1), atol=1e-5)
    mf = json.loads((tokenizers["vq"]["tokens"] / "manifest.json").read_text())
    assert (mf["codebook"], mf["codebook_size"], mf["quantizer"], mf["token_shape"], mf["bits_per_index"]) == ("learned", 64, "vq", [1, 8, 8], 6)
    assert mf["fingerprint"] == vq.describe()["fingerprint"] and mf["model_id"] == vq.model_id
    _, h = load_tokens(tokenizers["vq"]["tokens"] / "shard-000000.gqt")
    assert torch.equal(load_tokens(tokenizers["vq"]["tokens"] / "shard-000000.gqt")[0][:3], idx)
    assert h.codebook == "learned"


@pytest.mark.parametrize("name", ["gq", "vq"])
def test_train_resume_and_sample_decodable_images(tokenizers, tmp_path, capsys, name):
    t = tokenizers[name]
    run = tmp_path / "prior"
    args = ["prior", "train", str(t["tokens"]), "--out", str(run), *PRIOR, "train.steps=3", "train.ckpt_every=2",
            f"data.eval_tokens={t['held']}", "--quiet"]
    assert gq_main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 3 and (run / "final").resolve().name == "checkpoint-3"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3]
    assert all(e["bits_per_token"] == pytest.approx(e["loss"] / math.log(2)) for e in lines)
    # the held-out bits per image are the summed cross-entropy of the held-out sequences
    prior, layout, info = load_prior(run)
    from gq_plugin.lab.prior.train import _sequences, load_token_folder

    seqs = _sequences(load_token_folder(t["held"]), layout)
    ref = -torch.log_softmax(prior.net(seqs[:, :-1]).double(), -1).gather(-1, seqs[:, 1:, None]).sum((1, 2)).mean() / math.log(2)
    assert res["eval"]["bits_per_image"] == pytest.approx(ref.item(), rel=1e-5) and res["eval"]["images"] == 4
    assert info["layout"]["tokens_per_image"] == (128 if name == "gq" else 64)

    # a rerun of the finished run trains nothing; more steps resume from checkpoint-3
    assert gq_main(args) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3 and len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert gq_main([*args[:-1], "train.steps=4", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4 and (run / "final").resolve().name == "checkpoint-4"

    out = tmp_path / "samples"
    assert gq_main(["prior", "sample", str(run), "--n", "9", "--out", str(out), "--batch-size", "4", "--quiet"]) == 0
    pngs = sorted(out.glob("sample-*.png"))
    assert len(pngs) == 9 and PIL.open(out / "grid.png").size[1] > SIZE
    tok = load_tokenizer(t["model"])
    idx, header = load_tokens(out / "samples.gqt")
    tok.check_tokens({**header.__dict__, "model_id": header.model_id})
    assert idx.shape == (9, 2 if name == "gq" else 1, 8, 8) and int(idx.max()) < tok.codebook_size
    decoded = tok.decode(idx)
    for i in (0, 8):  # every PNG is the tokenizer's decoding of the sampled indices
        png = torch.from_numpy(np.asarray(PIL.open(pngs[i]), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert png.shape == (3, SIZE, SIZE) and (png - decoded[i]).abs().max() <= 1 / 127.5 + 1e-6


def test_resumed_training_equals_uninterrupted(tokenizers, tmp_path, capsys):
    t = tokenizers["vq"]["tokens"]
    base = ["prior", "train", str(t), *PRIOR, "--quiet"]
    assert gq_main([*base, "--out", str(tmp_path / "a"), "train.steps=4"]) == 0
    assert gq_main([*base, "--out", str(tmp_path / "b"), "train.steps=2"]) == 0
    assert gq_main([*base, "--out", str(tmp_path / "b"), "train.steps=4"]) == 0
    capsys.readouterr()
    a = torch.load(tmp_path / "a" / "final" / "prior.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "final" / "prior.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(capsys, argv, pattern):
    assert gq_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    return err


def test_bad_input_gets_one_clear_line(tokenizers, tmp_path, capsys):
    gq, vq = tokenizers["gq"], tokenizers["vq"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["prior", "train", str(empty), "--out", str(tmp_path / "r0")], "holds no token shards")
    _one_line_error(capsys, ["prior", "train", str(tmp_path / "nope"), "--out", str(tmp_path / "r0")], "is not a directory")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(vq["tokens"], corrupt)
    shard = corrupt / "shard-000000.gqt"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    _one_line_error(capsys, ["prior", "train", str(corrupt), "--out", str(tmp_path / "r1")], "shard-000000.gqt: token file checksum mismatch")

    _one_line_error(capsys, ["prior", "train", str(vq["tokens"]), "--out", str(tmp_path / "r2"), f"data.eval_tokens={gq['held']}"],
                    "were made by another tokenizer than the training tokens")

    run = tmp_path / "r3"
    assert gq_main(["prior", "train", str(vq["tokens"]), "--out", str(run), *PRIOR, "train.steps=1", "--quiet"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["prior", "sample", str(run), "--n", "2", "--out", str(tmp_path / "s"), "--tokenizer", str(gq["model"])],
                    "were made by another tokenizer than")
    _one_line_error(capsys, ["prior", "train", str(vq["tokens"]), "--out", str(run), *PRIOR, "model.dim=64", "train.steps=1"],
                    "holds a prior trained with other settings or tokens (config.model.dim)")
    _one_line_error(capsys, ["prior", "sample", str(tmp_path), "--n", "2", "--out", str(tmp_path / "s")], "is not a prior run folder")


def test_two_processes_under_accelerate_launch_equal_one_process(tokenizers, tmp_path, capsys):
    """Each rank takes its slice of the global batch and DDP averages the gradients: 2 ranks x 2
    sequences train the same weights as 1 process x 4 sequences."""
    import os
    import subprocess
    import sys

    import socket

    t = str(tokenizers["vq"]["tokens"])
    common = [*PRIOR, "train.steps=3"]
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold accelerate's default 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no GPU: accelerate falls back to gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gq_plugin.lab.cli", "prior", "train", t, "--out", str(tmp_path / "ddp"),
           *common, "train.batch_size=2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gq_main(["prior", "train", t, "--out", str(tmp_path / "one"), *common, "train.batch_size=4", "--quiet"]) == 0
    capsys.readouterr()
    a = torch.load(tmp_path / "ddp" / "final" / "prior.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "final" / "prior.pt", weights_only=True)
    assert a["step"] == b["step"] == 3 and a["samples_seen"] == b["samples_seen"] == 12
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k
