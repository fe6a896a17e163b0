"""lctrun installed (not a checkout): the packaged experiments and tables are found from any directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_lctrun_finds_its_experiments_and_tables_from_another_directory(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"
    for name in ("lctrun", "pyproject.toml", "README.md"):  # a copy: building writes build/ beside the sources
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "lctrun" else {}),
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    build = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install

    def lctrun(*args):
        return subprocess.run(
            [sys.executable, "-m", "lctrun", *args], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
        )

    where = subprocess.run(
        [sys.executable, "-c", "import lctrun; print(lctrun.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout

    tables = lctrun("reproduce", "--list")
    assert tables.returncode == 0 and "lct-iclr-table1" in tables.stdout and "layer-parallel" in tables.stdout
    fake = ["data.name=fake", "data.shape=[1,16,16]", "data.train_size=32", "data.test_size=16", "epochs=1"]
    run = lctrun("train", "mnist-cnn", *fake, "--out", str(elsewhere / "run"))
    assert run.returncode == 0, run.stderr
    assert (elsewhere / "run" / "metrics.csv").is_file()
    smoke = lctrun("reproduce", "lct-iclr-table4", "--scale", "smoke", "--out", str(elsewhere / "tables"))
    assert smoke.returncode == 0, smoke.stderr
    assert (elsewhere / "tables" / "lct-iclr-table4-smoke" / "table.md").is_file()
