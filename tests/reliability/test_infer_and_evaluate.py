"""Reliability: bad images through `segpipe infer`, bad label maps through `segpipe evaluate`, and
`kill -9` in the middle of a batch.

Each test is one case; its docstring's first line says the behaviour. The network is a small one
with random weights (the ``tiny_model`` fixture): what is tested happens around it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_bad_datasets import huge_nifti2

from segpipe import cli
from segpipe.inference.batch_report import is_report_file
from segpipe.io.image import read_image

REPO = Path(__file__).resolve().parents[2]
#: one thread: the subprocess leaves the other core to the test
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _bad_images(good: Path, folder: Path) -> dict[str, str]:
    """Write bad images beside a copy of ``good`` into ``folder``: {case id: words of its error}."""
    nii = nib.load(str(good))
    a = np.asarray(nii.dataobj)

    def save(name: str, array: np.ndarray) -> None:
        nib.save(nib.Nifti1Image(array, nii.affine), str(folder / f"{name}.nii.gz"))

    with_nan = a.astype(np.float32)
    with_nan[1, 2, 3] = np.nan
    save("nan_voxel", with_nan)
    with_inf = a.astype(np.float32)
    with_inf[0, 0, 0] = np.inf
    save("inf_voxel", with_inf)
    save("flat_2d", a[:, :, 0].copy())
    save("two_channels", np.stack([a, a], axis=-1))
    save("blank", np.zeros_like(a))
    save("no_voxels", np.zeros((0, 5, 5), a.dtype))
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "zero_bytes.nii.gz").write_bytes(b"")
    huge_nifti2(folder / "huge_header.nii.gz")
    shutil.copy(good, folder / "good.nii.gz")
    (folder / "notes.txt").write_text("not an image: not a case either\n")
    return {
        "nan_voxel": "nan",
        "inf_voxel": "inf",
        "flat_2d": "2-d image",
        "two_channels": "2 channel(s) found",
        "blank": "empty",
        "no_voxels": "empty axis",
        "truncated": "cannot read",
        "zero_bytes": "not a nifti file",
        "huge_header": "100000, 100000, 100000",
    }


def test_bad_images_in_a_batch_infer_are_each_reported_and_skipped_and_the_good_one_written(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN/inf voxels, 2-D, 2 channels, blank, no voxels, truncated, 0 bytes, a 100000³ header: each reported, the good case written."""
    model, good = tiny_model
    batch = tmp_path / "batch"
    batch.mkdir()
    expected = _bad_images(good, batch)
    out = tmp_path / "out"
    code = cli.main(["infer", str(batch), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    captured = capsys.readouterr()
    assert code == 3, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["written"] == ["good"]
    failed = {f["case"]: f["error"] for f in result["failed"]}
    assert set(failed) == set(expected), failed
    for case, words in expected.items():
        assert words in failed[case].lower() and f"{case}.nii.gz" in failed[case], (case, failed[case])
        assert "\n" not in failed[case]
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "good.json",
        "good.nii.gz",
        "good_labels.json",
    ]
    # one bad image on its own: exit 3, the same reason, no output file
    single = tmp_path / "single"
    code = cli.main(["infer", str(batch / "huge_header.nii.gz"), "-o", str(single), "-m", str(model), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 3 and not result["written"] and "100000, 100000, 100000" in result["failed"][0]["error"], result
    assert not single.exists() or all(is_report_file(p) for p in single.iterdir())  # the report names the failure


@pytest.fixture
def threads_of_env() -> Iterator[None]:
    """This process computes with the threads a subprocess given ``ENV`` gets: OpenVINO's sums, and so
    the labels of near-tie voxels of random weights, depend on the number of threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill_9_during_a_batch_infer_then_the_same_command_writes_the_rest_once(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], threads_of_env: None
) -> None:
    """`kill -9` of `infer` halfway through 12 cases, then the same command: finished cases are kept, the rest written
    once, every output complete and equal to an uninterrupted run's, no temporary left."""
    model, good = tiny_model
    sources = sorted(good.parents[1].glob("images*/*.nii.gz"))
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(12):
        shutil.copy(sources[i % len(sources)], inputs / f"case_{i:02d}.nii.gz")
    reference = tmp_path / "reference"
    assert cli.main(["infer", str(inputs), "-o", str(reference), "-m", str(model), "tta=false", "-q"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "segpipe", "infer", str(inputs), "-o", str(out), "-m", str(model), "tta=false"]
    proc = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("case_??.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # freeze it, then look: the kill lands between two cases' outputs
        done = sorted(p.name[: -len(".json")] for p in out.glob("case_??.json"))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert 2 <= len(done) < 12, f"the kill did not land halfway: {done}"
    stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in done}
    code = cli.main(["infer", str(inputs), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(result["skipped"]) == done
    assert sorted(result["written"]) == sorted({f"case_{i:02d}" for i in range(12)} - set(done))
    assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in done} == stamps  # not written twice
    for i in range(12):
        name = f"case_{i:02d}.nii.gz"
        np.testing.assert_array_equal(read_image(out / name)[0], read_image(reference / name)[0])
    names = sorted(p.name for p in out.iterdir() if not is_report_file(p))
    assert names == sorted(f"case_{i:02d}{ext}" for i in range(12) for ext in (".json", ".nii.gz", "_labels.json")), (
        names
    )
    report = (out / "report.html").read_text()
    assert "12 segmented" not in report and "0 not yet segmented" in report  # the re-run completed the report


def _rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], dtype: type | None = None) -> None:
    nii = nib.load(str(path))
    data = fn(np.asarray(nii.dataobj))
    nib.save(nib.Nifti1Image(data.astype(dtype or data.dtype), nii.affine), str(path))


#: a bad prediction or reference folder: name -> (how it breaks (prediction folder, reference folder, case file),
#: words of the error); a missing prediction is refused with strict=true (without it the others are scored)
BAD_EVALUATIONS: dict[str, tuple[Callable[[Path, Path, str], None], str]] = {
    "missing_prediction": (lambda p, r, c: (p / c).unlink(), "no prediction for 1 of 2"),
    "prediction_without_reference": (lambda p, r, c: shutil.copy(p / c, p / "stray.nii.gz"), "stray"),
    "off_grid": (lambda p, r, c: _rewrite(p / c, lambda a: a[:, :, :-2]), "not on the voxel grid"),
    "non_integer": (lambda p, r, c: _rewrite(p / c, lambda a: a * 0.5, np.float32), "non-integer values"),
    "nan_labels": (
        lambda p, r, c: _rewrite(p / c, lambda a: np.where(a == 1, np.nan, a), np.float32),
        "non-integer values (e.g. nan)",
    ),
    "truncated_prediction": (lambda p, r, c: (p / c).write_bytes((p / c).read_bytes()[:100]), "cannot read"),
    "empty_reference_file": (lambda p, r, c: (r / c).write_bytes(b""), "not a nifti file"),
}


@pytest.mark.parametrize("name", list(BAD_EVALUATIONS))
def test_evaluate_refuses_a_bad_prediction_or_reference_naming_the_case_and_file(
    name: str, tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing (with `strict=true`), stray, off-grid, non-integer, NaN or truncated prediction, or an empty reference file: one error, no tables."""
    breaks, words = BAD_EVALUATIONS[name]
    labels = sorted((tiny_model[1].parents[1] / "labelsTr").glob("*.nii.gz"))[:2]
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for folder in (pred, ref):
        folder.mkdir()
        for f in labels:
            shutil.copy(f, folder / f.name)
    breaks(pred, ref, labels[0].name)
    code = cli.main(["evaluate", str(pred), str(ref), *(["strict=true"] if name == "missing_prediction" else [])])
    err = capsys.readouterr().err
    assert code == 3, err
    line = err.strip().splitlines()[0]
    assert line.startswith("segpipe evaluate: error: ") and words in line.lower(), line
    assert "Traceback" not in err
    assert not {"evaluation.csv", "summary.json", "dice_boxplot.png"} & {p.name for p in pred.iterdir()}
