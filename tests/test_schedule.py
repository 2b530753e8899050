"""optim.lr_schedule: the LR curve, its validation, and that training (and a resume) follow it."""

import itertools
import json
import math
import shutil

import pytest
from test_train_cli import photo_dir, write_recipe  # noqa: F401  (fixture)

from gq_plugin.lab.config import load_config
from gq_plugin.lab.schedule import lr_at


def test_cosine_runs_from_lr_to_the_final_fraction():
    steps, lr = 101, 2e-3
    assert lr_at(0, steps, lr, "cosine", 0.1) == pytest.approx(2e-3)
    assert lr_at(50, steps, lr, "cosine", 0.1) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean
    assert lr_at(100, steps, lr, "cosine", 0.1) == pytest.approx(2e-4)
    assert lr_at(250, steps, lr, "cosine", 0.0) == 0.0  # past the end: stays at the final LR
    curve = [lr_at(s, steps, lr, "cosine", 0.0) for s in range(steps)]
    assert all(a > b for a, b in itertools.pairwise(curve))  # strictly decreasing
    assert curve[25] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert {lr_at(s, steps, lr) for s in range(steps)} == {lr}  # constant (the default)


@pytest.mark.parametrize(
    "override, word",
    [("optim.lr_schedule=linear", "lr_schedule"), ("optim.lr_final_frac=1.5", "lr_final_frac"), ("optim.lr_final_frac=-0.1", "lr_final_frac")],
)
def test_bad_schedule_settings_are_named(override, word):
    with pytest.raises(ValueError, match=word):
        load_config("tiny_cpu", [override])


def test_training_and_resume_follow_the_schedule(photo_dir, tmp_path):  # noqa: F811
    from gq_plugin.lab.cli import main as gq_main

    recipe = write_recipe(tmp_path / "micro.yaml", photo_dir, tmp_path / "out", optim={"lr": 1e-3, "lr_schedule": "cosine", "lr_final_frac": 0.2},
                          train={"log_every": 1})
    assert gq_main(["train", str(recipe), "--quiet"]) == 0
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the entry logged after step k holds the LR of the step k - 1 -> k
    assert [e["lr"] for e in logs] == pytest.approx([lr_at(e["step"] - 1, 6, 1e-3, "cosine", 0.2) for e in logs])
    assert logs[0]["lr"] == pytest.approx(1e-3) and logs[-1]["lr"] == pytest.approx(2e-4)
    # a resume from checkpoint-3 continues on the same curve (the LR is a function of the step)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "out" / "checkpoint-3", resumed / "checkpoint-3")
    assert gq_main(["train", str(recipe), f"train.output_dir={resumed}", "--resume", "latest", "--quiet"]) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in again] == [4, 5, 6]
    assert [e["lr"] for e in again] == [e["lr"] for e in logs[3:]]
    assert [e["loss"] for e in again] == pytest.approx([e["loss"] for e in logs[3:]], rel=1e-5)
