"""Reliability: the limits of one prediction — window overlap, case length, case thickness.

A sliding window at a very high ``overlap=`` must not try to hold every rounded start position,
a long case must say how far it is, and a volume of one or two slices must segment like any
volume smaller than the patch. Each test is one case; its docstring's first line says the
behaviour. The network is a small one with random weights (the ``tiny_model`` fixture).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from segpipe import cli
from segpipe.geometry import Geometry
from segpipe.inference import sliding_window_inference, window_starts
from segpipe.io.image import read_image, write_image
from segpipe.planning import load_plan

REPO = Path(__file__).resolve().parents[2]
#: one thread: the subprocess leaves the other core to the test
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _nnunet_starts(size: int, patch: int, overlap: float) -> list[int]:
    """nnU-Net's ``compute_steps_for_sliding_window`` for one axis, as written (rounded, not deduplicated)."""
    step = patch * (1.0 - overlap)
    n = int(math.ceil((size - patch) / step)) + 1
    actual = (size - patch) / (n - 1) if n > 1 else 0.0
    return [int(round(actual * i)) for i in range(n)]


def _plan_grid(model: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The 3d_fullres patch and spacing of a model folder: an image on that spacing is not resampled."""
    cfg = load_plan(model / "plans.json").config("3d_fullres")
    return tuple(int(p) for p in cfg.patch_size), tuple(float(s) for s in cfg.spacing)


def _volume(path: Path, shape: tuple[int, int, int], spacing: tuple[float, ...], seed: int = 0) -> Geometry:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    geo = Geometry(shape=shape, spacing=spacing, origin=(4.0, -3.0, 2.0))
    write_image(path, image, geo)
    return geo


def _run_bounded(command: list[str], *, seconds: float, rss_mb: float) -> tuple[int | None, str, str, float]:
    """Run ``command``, killing it past ``seconds`` or ``rss_mb`` of resident memory: (exit code or None, stdout,
    stderr, peak RSS in MB)."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    me, peak, code = psutil.Process(proc.pid), 0.0, None
    deadline = time.monotonic() + seconds
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                rss = 0
            peak = max(peak, rss / 2**20)
            if peak > rss_mb:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=60)
        code = proc.returncode
    return (code if code is not None and code >= 0 else None), out, err, peak


def test_window_starts_at_a_very_high_overlap_are_each_distinct_position_once() -> None:
    """At `overlap=0.99` each distinct window start is slid once, not once per rounded duplicate; usual overlaps keep
    nnU-Net's grid."""
    for size, patch in [(300, 64), (110, 64), (513, 128), (65, 64), (64, 64)]:
        for overlap in (0.99, 0.999, 0.99999):
            got = window_starts([size], [patch], overlap)[0]
            assert got == sorted(set(_nnunet_starts(size, patch, overlap))), (size, patch, overlap)
            assert len(got) <= size - patch + 1
        for overlap in (0.0, 0.25, 0.5, 0.75, 0.9):
            assert window_starts([size], [patch], overlap)[0] == _nnunet_starts(size, patch, overlap)
    # 0.99 on 300 voxels and a 64-voxel patch: nnU-Net's rounding lists 370 starts, 237 of them distinct
    assert len(_nnunet_starts(300, 64, 0.99)) == 370
    assert window_starts([300, 300, 300], [64, 64, 64], 0.99) == [list(range(237))] * 3
    # the sums are those of each distinct window once (one extra pass of a window would change nothing, but costs)
    image = torch.arange(12 * 10, dtype=torch.float32).reshape(1, 12, 10)
    seen: list[int] = []

    def count(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return batch

    out = sliding_window_inference(image, count, (8, 8), overlap=0.999, batch_size=64)
    assert out is not None and sum(seen) == 5 * 3
    torch.testing.assert_close(out, image)


@pytest.mark.slow
def test_an_overlap_needing_millions_of_windows_is_refused_at_once_in_little_memory(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """`infer … overlap=0.99999` on a case that would need 1.6 million windows is refused within seconds in little
    memory (exit 3, naming the count and `overlap=`); an overlap outside [0, 1) is a usage error (exit 2)."""
    model, _good = tiny_model
    patch, spacing = _plan_grid(model)
    # on the plan's own grid: (64 - 20 + 1) × (260 - 64 + 1) × (260 - 80 + 1) distinct windows with the tiny plan
    shape = (patch[0] + 44, patch[1] + 196, patch[2] + 180)
    _volume(tmp_path / "large.nii.gz", shape, spacing)
    command = [sys.executable, "-m", "segpipe", "infer", str(tmp_path / "large.nii.gz"), "-o", str(tmp_path / "out")]
    command += ["-m", str(model), "tta=false", "--json"]
    t0 = time.monotonic()
    code, out, err, peak = _run_bounded([*command, "overlap=0.99999"], seconds=240, rss_mb=2000)
    assert code == 3, f"exit {code} after {time.monotonic() - t0:.0f} s, peak RSS {peak:.0f} MB\n{err[-2000:]}"
    assert time.monotonic() - t0 < 120 and peak < 1500, (time.monotonic() - t0, peak)
    failure = json.loads(out)["failed"][0]
    windows = (shape[0] - patch[0] + 1) * (shape[1] - patch[1] + 1) * (shape[2] - patch[2] + 1)
    assert f"{windows:,}" in failure["error"] and "overlap=0.99999" in failure["error"], failure
    assert "overlap=" in failure["hint"], failure
    assert not (tmp_path / "out" / "large.nii.gz").exists()
    for bad in ("overlap=1", "overlap=1.5", "overlap=-0.1", "overlap=nan"):
        code = cli.main(["infer", str(tmp_path / "large.nii.gz"), "-o", str(tmp_path / "out"), "-m", str(model), bad])
        assert code == 2, bad


@pytest.mark.slow
def test_a_long_case_reports_its_windows_as_it_goes_and_nothing_with_q(
    tiny_model: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a case is slid, `infer` logs how many of its windows are done (a line every ~10 %, ≥ 5 s apart, or every
    30 s; a redrawn bar on a terminal), and nothing with `-q`."""
    import segpipe.inference.sliding_window as sliding_window

    model, _good = tiny_model
    patch, spacing = _plan_grid(model)
    shape = (patch[0] + 10, patch[1] + 36, patch[2] + 20)  # 2 × 3 × 2 windows at overlap 0.5
    _volume(tmp_path / "long.nii.gz", shape, spacing)
    # the CLI in its own process (its logging as set up for a user), with log lines due at each 10 % of a short case
    snippet = "import sys, segpipe.progress as p; p.LOG_MIN_INTERVAL = 0.0; from segpipe.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", snippet, "infer", str(tmp_path / "long.nii.gz"), "-m", str(model), "tta=false"]
    command += ["batch_size=1"]
    for quiet in (False, True):
        flags = ["-o", str(tmp_path / f"out{quiet}")] + (["-q"] if quiet else [])
        run = subprocess.run([*command, *flags], cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        lines = [line for line in run.stderr.splitlines() if "windows" in line]
        if quiet:
            assert not lines, lines
            continue
        assert len(lines) >= 5, run.stderr
        assert "long: sliding window: 12/12 windows in " in lines[-1], lines
        assert any("/12 windows (" in line for line in lines[:-1]), lines
    # a terminal: one line redrawn in place once the case has run a while (here at once), ended when it is done
    monkeypatch.setattr(logging.getLogger("segpipe"), "level", logging.INFO)
    monkeypatch.setattr(sliding_window, "WINDOW_PROGRESS_DELAY", 0.0)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    sliding_window_inference(torch.zeros(1, 16, 16, 16), lambda x: x, (8, 8, 8), batch_size=3, progress=True)
    assert tty.getvalue().startswith("\rsliding window  [") and tty.getvalue().endswith("\n")
    assert "27/27 windows" in tty.getvalue().split("\r")[-1]


def test_a_volume_of_one_or_two_slices_is_segmented_on_its_own_grid(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A 3-D volume of 1 or 2 slices (thinner than the patch) is segmented on its own grid, as any small volume is; a 2-D
    file is still refused as a 2-D image."""
    model, _good = tiny_model
    inputs = tmp_path / "thin"
    inputs.mkdir()
    geos = {
        "one_slice": _volume(inputs / "one_slice.nii.gz", (1, 90, 100), (2.0, 0.8, 0.8)),
        "two_slices": _volume(inputs / "two_slices.nii.gz", (2, 90, 100), (5.0, 0.8, 0.8), seed=1),
    }
    out = tmp_path / "out"
    assert cli.main(["infer", str(inputs), "-o", str(out), "-m", str(model), "tta=false", "-q"]) == 0
    for case, geo in geos.items():
        label, label_geo = read_image(out / f"{case}.nii.gz")
        assert label.shape == (1, *geo.shape) and not label_geo.differences(geo), (case, label_geo)
        assert json.loads((out / f"{case}.json").read_text())["geometry"]["shape"] == list(geo.shape)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((100, 90), np.float32), np.eye(4)), str(flat))
    assert cli.main(["infer", str(flat), "-o", str(tmp_path / "flat"), "-m", str(model), "tta=false", "-q"]) == 3
