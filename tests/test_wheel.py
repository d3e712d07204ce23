"""The wheel ships conf/: a non-editable install composes its config from outside the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_install_composes_config_outside_the_repo(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "segpipe_work", "__pycache__", ".pytest_cache"
        ),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("segpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "segpipe/conf/config.yaml" in names and "segpipe/conf/planner/default.yaml" in names
    # every package of the source tree is in the wheel (the list in pyproject.toml is explicit)
    source = {str(p.relative_to(REPO)) for p in (REPO / "segpipe").rglob("*.py") if "__pycache__" not in p.parts}
    assert source <= set(names), sorted(source - set(names))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # Dependencies come from this interpreter's site-packages (appended, so the wheel's segpipe wins);
    # .pth files there are not processed, so the editable checkout stays invisible.
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as zf:  # install = unpack (a pure-Python wheel); no network, no pip needed
        zf.extractall(purelib)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import json, segpipe; from segpipe.config import compose_config, to_container; from segpipe.settings import config_dir;"
        "cfg = compose_config(['gpu_memory_gb=12']);"
        "print(json.dumps({'file': segpipe.__file__, 'conf': str(config_dir()), 'cfg': to_container(cfg)}))"
    )
    r = subprocess.run(
        [str(py), "-c", code],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["file"].startswith(purelib) and out["conf"].startswith(purelib)
    assert out["cfg"]["planner"]["gpu_memory_gb"] == 12
    r = subprocess.run(
        [str(py), "-m", "segpipe", "config", "--json", "seed=7"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["train"]["seed"] == 7
