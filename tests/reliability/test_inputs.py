"""Reliability: odd but valid inputs that must work, and bad inputs that must fail cleanly.

Each test is one case of the reliability list; its docstring's first line says the behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
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


def test_intensities_near_1e33_normalise_to_unit_variance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Images with values near 1e33 plan and preprocess (z-score and CT) into finite caches of unit scale, not zeros."""
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
    # through the commands, with the MR-like z-score and with CT's clipping to the fingerprint's statistics
    import nibabel as nib

    from segpipe import cli

    data = generate_demo_dataset(tmp_path / "Huge", num_cases=3, num_test=0)
    for f in sorted((data / "imagesTr").glob("*.nii.gz")):
        nii = nib.load(str(f))
        a = np.asarray(nii.dataobj).astype(np.float64)
        scaled = (a - a.min()) / (a.max() - a.min() + 1.0) * 2e33 + 1e33
        nib.save(nib.Nifti1Image(scaled.astype(np.float32), nii.affine), str(f))
    for modality in ("MR", "CT"):
        desc = json.loads((data / "dataset.json").read_text())
        (data / "dataset.json").write_text(json.dumps({**desc, "modality": {"0": modality}}))
        work = tmp_path / f"work_{modality}"
        assert cli.main(["plan", str(data), f"work_dir={work}", "configurations=[3d_fullres]", "-q"]) == 0
        assert cli.main(["preprocess", f"work_dir={work}", "-q"]) == 0, capsys.readouterr().err
        for cached in sorted((work / "Huge" / "cache").glob("*/*/image.npy")):
            x = np.load(cached)
            assert np.isfinite(x).all() and 0.5 < float(x.std()) < 1.5 and np.abs(x).max() < 10, (modality, cached)


def test_a_target_spacing_too_fine_to_preprocess_is_refused_at_plan_time(tmp_path: Path) -> None:
    """A target_spacing whose caches could not fit is refused by `plan` with the estimate, writing no plan."""
    data = generate_demo_dataset(tmp_path / "Fine", num_cases=3, num_test=0)
    work = tmp_path / "work"
    r = segpipe_cli("plan", str(data), f"work_dir={work}", "target_spacing=[0.01,0.01,0.01]")
    assert r.returncode != 0
    message = r.stderr.strip().splitlines()
    assert any("largest case would take" in line and "GB" in line for line in message), r.stderr
    assert any("target_spacing" in line for line in message)
    assert not (work / "Fine" / "plans.json").exists() and not (work / "Fine" / "plan_summary.md").exists()
    # the estimate itself, by hand: every case at 1 mm isotropic, float32 image + uint8 label
    from segpipe.fingerprint import load_fingerprint
    from segpipe.planning import PlanSettings, make_plan
    from segpipe.planning.run import preprocessed_sizes

    fp = load_fingerprint(work / "Fine" / "fingerprint.json")
    plan = make_plan(fp, PlanSettings(target_spacing=[1.0, 1.0, 1.0], configurations=["3d_fullres"]))
    expected = []
    for case in fp["cases"]:
        shape = [case["shape_after_crop"][a] for a in plan.transpose_forward]
        spacing = [case["spacing"][a] for a in plan.transpose_forward]
        expected.append(int(np.prod([max(1, round(n * s)) for n, s in zip(shape, spacing)])) * 5)
    size = preprocessed_sizes(plan, fp)["3d_fullres"]
    assert size == {"cache_bytes": sum(expected), "largest_case_bytes": max(expected)}


@pytest.mark.slow
def test_accents_and_spaces_in_case_ids_through_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case ids with accents and spaces go through check, plan, preprocess, train, infer and evaluate as they are."""
    from segpipe import cli

    data = generate_demo_dataset(tmp_path / "Cases", num_cases=3, num_test=1)
    case = "patiënt 01"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder / "demo_001.nii.gz").rename(data / folder / f"{case}.nii.gz")
    desc = json.loads((data / "dataset.json").read_text())
    desc["training"][1] = {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
    (data / "dataset.json").write_text(json.dumps(desc, ensure_ascii=False), encoding="utf-8")
    work = tmp_path / "wörk"
    steps = [
        ("check", str(data)),
        ("plan", str(data), f"work_dir={work}", "configurations=[3d_fullres]", "base_features=4", "max_features_3d=16"),
        ("preprocess", f"work_dir={work}"),
        ("train", f"work_dir={work}", "fold=all", "epochs=1", "iterations_per_epoch=1", "val_batches=1"),
    ]
    for step in steps:  # in this process; `infer` below runs as a command of its own (argv, stdout encoding)
        code = cli.main(list(step))
        assert code == 0, (step[0], capsys.readouterr().err[-2000:])
    assert (work / "Cases" / "cache").is_dir() and list((work / "Cases" / "cache").glob(f"*/{case}/image.npy"))
    images = tmp_path / "zu segmentieren"
    images.mkdir()
    shutil.copy(data / "labelsTr" / f"{case}.nii.gz", tmp_path / "ref.nii.gz")
    shutil.copy(data / "imagesTr" / f"{case}.nii.gz", images / f"{case}.nii.gz")
    out = tmp_path / "Ergebnis"
    r = segpipe_cli("infer", str(images), "-o", str(out), f"work_dir={work}", "tta=false", "folds=all")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / f"{case}.nii.gz").is_file() and json.loads((out / f"{case}.json").read_text())["case"] == case
    refs = tmp_path / "Referenz"
    refs.mkdir()
    shutil.copy(tmp_path / "ref.nii.gz", refs / f"{case}.nii.gz")
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), str(refs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metric_per_case"][0]["case"] == case


def test_one_training_case_is_planned_with_a_warning_and_fold_0_says_what_5_folds_need(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One labelled case: `check` and `plan` warn that 5 folds need 5 cases; `train fold=0` refuses, naming fold=all."""
    from segpipe import cli

    data = generate_demo_dataset(tmp_path / "One", num_cases=1, num_test=0)
    work = tmp_path / "work"
    assert cli.main(["check", str(data), "--json"]) == 0  # a warning, not an error
    finding = json.loads(capsys.readouterr().out)["findings"][0]
    assert finding["problem"] == "too_few_cases" and finding["severity"] == "warning"
    assert "5-fold cross-validation needs at least 5" in finding["message"] and "fold=all" in finding["message"]
    assert cli.main(["plan", str(data), f"work_dir={work}", "configurations=[3d_fullres]", "-q"]) == 0
    assert cli.main(["preprocess", f"work_dir={work}", "-q"]) == 0
    capsys.readouterr()
    code = cli.main(["train", f"work_dir={work}", "fold=0", "epochs=1", "iterations_per_epoch=1", "num_workers=0"])
    err = capsys.readouterr().err
    assert code != 0 and "cannot make 5 folds from 1 case" in err and "fold=all" in err, err
    assert not (work / "One" / "runs").exists() or not any((work / "One" / "runs").rglob("*.pt"))


def test_a_dataset_that_declares_external_links_reads_files_linked_from_shared_storage(tmp_path: Path) -> None:
    """With `"external_links": true` in dataset.json, case files linked from outside the folder are read as usual."""
    import segpipe

    data = generate_demo_dataset(tmp_path / "Linked", num_cases=3, num_test=0)
    shared = tmp_path / "pacs_export"
    shutil.move(str(data / "imagesTr"), shared)
    (data / "imagesTr").mkdir()
    for f in sorted(shared.iterdir()):
        (data / "imagesTr" / f.name).symlink_to(f)
    desc = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**desc, "external_links": True}))
    report = segpipe.check(data, num_workers=1)
    assert report.ok and report.cases_checked == 3, report.findings
    (data / "dataset.json").write_text(json.dumps(desc))  # without the declaration: refused
    with pytest.raises(segpipe.SegpipeError, match="outside the dataset folder"):
        segpipe.check(data, num_workers=1)
