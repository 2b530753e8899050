"""The wheel builds without setuptools warnings, installs into a fresh target and imports from there."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("gq_plugin", "csrc"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-v", "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("gq_plugin-*.whl"))
    assert len(wheels) == 1
    return wheels[0], proc.stdout + proc.stderr


def test_wheel_builds_without_deprecation_warnings(wheel):
    _, log = wheel
    assert "deprecated" not in log.lower(), [line for line in log.splitlines() if "deprecat" in line.lower()][:5]


def test_wheel_contents(wheel):
    whl, _ = wheel
    names = zipfile.ZipFile(whl).namelist()
    assert "gq_plugin/csrc/gq_search_cpu.cpp" in names
    assert "gq_plugin/recipes/tiny_cpu.yaml" in names
    assert "gq_plugin/lab/tokenize_dataset.py" in names
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    entry = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gq = gq_plugin.lab.cli:main" in entry


def test_wheel_installs_and_imports_from_target(wheel, tmp_path):
    whl, _ = wheel
    target = tmp_path / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(whl)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import json, gq_plugin, gq_plugin.lab.cli as cli; from gq_plugin.search import kernels; from gq_plugin.lab import config;"
        "print(json.dumps({'file': gq_plugin.__file__, 'csrc': str(kernels.source_dir()), 'recipes': config.list_recipes(),"
        " 'tokenize': 'tokenize' in cli.build_parser().format_help()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(target))  # not the source tree
    assert info["csrc"].startswith(str(target))
    assert "tiny_cpu" in info["recipes"] and info["tokenize"]
