"""Reliability: odd but valid inputs that must work, and bad inputs that must fail cleanly.

Each test is one case of the reliability list; its docstring's first line says the behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segpipe.demo_data import generate_demo_dataset
from segpipe.geometry import Geometry
from segpipe.preprocessing import preprocess_arrays
from segpipe.preprocessing.normalization import mean_std
from segpipe.preprocessing.spec import ChannelNorm, PreprocessSpec

REPO = Path(__file__).resolve().parents[2]


def segpipe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segpipe", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )


@pytest.mark.slow
def test_spaces_accents_quotes_and_commas_in_the_dataset_path_and_work_dir(tmp_path: Path) -> None:
    """Paths with spaces, accents, a quote, a comma and brackets work as given on the command line."""
    data = generate_demo_dataset(tmp_path / "Dätensatz mit Leerzeichen", num_cases=5, num_test=0)
    work = tmp_path / "Arbeits ordner, l'été (1)"
    r = segpipe_cli("check", str(data), "--json")
    assert r.returncode == 0, r.stderr
    r = segpipe_cli("plan", str(data), f"work_dir={work}", "configurations=[3d_fullres]", "--json")
    assert r.returncode == 0, r.stderr
    # the workspace folder is the dataset folder's name in ASCII (accents dropped, spaces as _)
    plans = work / "Datensatz_mit_Leerzeichen" / "plans.json"
    assert plans.is_file() and json.loads(plans.read_text())["dataset"] == "Datensatz_mit_Leerzeichen"
    r = segpipe_cli("preprocess", str(data), f"work_dir={work}", "--json")  # found again by its path
    assert r.returncode == 0, r.stderr
    assert len(list((work / "Datensatz_mit_Leerzeichen" / "cache").glob("*/*"))) >= 5
    # the same folder named by the Python API, and a Windows-style path round trip through the CLI parser
    from segpipe.config import compose_config

    for path in (str(work), "C:\\data\\scans\\", "it's a \\'test"):
        assert compose_config([f"work_dir={path}"]).work_dir == path
    # names that cannot be a folder as they are
    from segpipe.workspace import default_dataset_name

    assert default_dataset_name("Hippocampus_v2") == "Hippocampus_v2"
    assert default_dataset_name("Lebers Tümor (2024)") == "Lebers_Tumor_2024"
    assert default_dataset_name("raw") == "raw_dataset" and default_dataset_name("日本") == "dataset"


def test_intensities_near_1e33_normalise_to_unit_variance() -> None:
    """A z-score of an image with values near 1e33 is finite (float32 squares would overflow to inf)."""
    rng = np.random.default_rng(0)
    image = (rng.random((1, 6, 7, 8), dtype=np.float32) * 2e33).astype(np.float32)
    mean, std = mean_std(image)
    ref = image.astype(np.float64)
    assert mean == pytest.approx(ref.mean(), rel=1e-5) and std == pytest.approx(ref.std(), rel=1e-5)
    spec = PreprocessSpec(
        transpose=(0, 1, 2),
        spacing=(1.0, 1.0, 1.0),
        normalization=(ChannelNorm(scheme="zscore"),),
    )
    out, _, props = preprocess_arrays(image, None, Geometry(shape=(6, 7, 8), spacing=(1.0, 1.0, 1.0)), spec, 2)
    assert np.isfinite(out).all()
    assert float(out.std()) == pytest.approx(1.0, rel=1e-3) and abs(float(out.mean())) < 1e-3
    assert props["normalization"][0]["std"] == pytest.approx(ref.std(), rel=1e-5)
    # ordinary magnitudes: exactly the float32 statistics as before
    small = rng.random(1000, dtype=np.float32)
    assert mean_std(small) == (float(small.mean()), float(small.std()))
