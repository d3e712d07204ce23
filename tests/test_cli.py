"""The CLI end to end, in subprocesses: exit codes, --json, one-line errors, overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_msd, tiny_case

from segpipe import write_image


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "segpipe", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=full_env,
        timeout=300,
    )


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("segpipe ")
    r = run("--help")
    assert r.returncode == 0
    for cmd in [
        "info",
        "check",
        "plan",
        "preprocess",
        "train",
        "infer",
        "evaluate",
        "find-best",
        "export",
        "config",
        "demo",
    ]:
        assert cmd in r.stdout


def test_check_exit_codes_and_json(tmp_path):
    root = make_msd(tmp_path / "ds")
    r = run("check", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    image, label, geo = tiny_case(2)
    image[0, 0, 0] = np.inf
    write_image(root / "imagesTr" / "case_002.nii.gz", image, geo)
    r = run("check", str(root), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["cases_with_errors"] == ["case_002"]
    assert out["findings"][0]["file"] == "imagesTr/case_002.nii.gz"
    r = run("check", str(root))
    assert r.returncode == 1 and "case_002" in r.stdout and "nan_inf" in r.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    r = run("check", str(tmp_path / "missing"))
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("segpipe check: error: ") and "not found" in lines[0] and len(lines) <= 2
    r = run("check", str(tmp_path / "missing"), "--json")
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "DatasetError" and err["exit_code"] == 3
    r = run("check", str(tmp_path / "missing"), "--debug")
    assert "Traceback" in r.stderr
    r = run("check")
    assert r.returncode == 2 and "takes one dataset" in r.stderr


def test_info_json(tmp_path):
    image, _, geo = tiny_case(0)
    path = write_image(tmp_path / "img.nrrd", image, geo)
    r = run("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "NRRD" and out["shape"] == [6, 10, 12] and out["dtype"] == "float32"
    np.testing.assert_allclose(out["spacing"], geo.spacing)
    np.testing.assert_allclose(out["origin"], geo.origin)
    assert out["min"] == pytest.approx(float(image.min()))


def test_config_overrides_and_unknown_keys(tmp_path):
    r = run("config", "--json", "gpu_memory_gb=24", "configurations=[3d_fullres]", f"work_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["planner"]["gpu_memory_gb"] == 24 and cfg["planner"]["configurations"] == ["3d_fullres"]
    assert cfg["work_dir"] == str(tmp_path)
    r = run("config", "--json", env={"SEGPIPE_WORK": str(tmp_path / "w")})
    assert json.loads(r.stdout)["work_dir"] == str(tmp_path / "w")
    r = run("config", "gpu_memory=3")
    assert r.returncode == 2 and "unknown setting 'gpu_memory'" in r.stderr and "gpu_memory_gb" in r.stderr


def test_demo_data_only(tmp_path):
    r = run("demo", "--data-only", str(tmp_path / "demo"), "--json")
    assert r.returncode == 0, r.stderr
    out = Path(json.loads(r.stdout)["data"])
    assert (out / "dataset.json").is_file() and len(list((out / "imagesTr").iterdir())) == 12
    r = run("demo", "--data-only", str(tmp_path / "demo"))
    assert r.returncode == 2 and "not empty" in r.stderr


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    short = ("epochs=2", "iterations_per_epoch=4")  # the default schedule's 300 steps take minutes
    r = run("demo", "--json", f"work_dir={tmp_path}", *short)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["check"]["ok"] and out["check_dicom"]["ok"] and out["check_dicom"]["cases_checked"] == 4
    plans = json.loads((tmp_path / "SegpipeDemo" / "plans.json").read_text())
    assert {"3d_fullres", "2.5d", "2d"} <= set(plans["configurations"]) and plans["anisotropic"] is True
    assert {row["configuration"] for row in out["plan"]["configurations"]} == set(plans["configurations"])
    from segpipe.preprocessing import Cache

    for name, step in out["preprocess"].items():
        assert step["cases"] == 12, name
        cache = Cache(step["cache_dir"])
        assert len(cache.cases()) == 12 and not cache.validate(), name
    assert (tmp_path / "SegpipeDemo" / "plan_summary.md").is_file()
    run_dir = Path(out["train"]["run_dir"])
    assert out["train"]["finished"] and out["train"]["epochs"] == 2
    for name in ("last.pt", "final.pt", "metrics.csv", "progress.png", "validation/summary.json"):
        assert (run_dir / name).is_file(), name
    # the held-out cases segmented (the DICOM one with a DICOM-SEG) and evaluated
    assert out["infer"]["cases"] == ["demo_012", "demo_013", "dicom_003"]
    assert out["infer"]["dicom_seg"] == ["dicom_003_seg.dcm"]
    demo_dir = tmp_path / "SegpipeDemo" / "demo"
    for name in ("predictions/demo_012.nii.gz", "predictions/dicom_003.json", "evaluation/summary.json"):
        assert (demo_dir / name).is_file(), name
    assert out["evaluate"]["cases"] == 3 and set(out["evaluate"]["class_dice"]) == {"organ", "vessel", "lesion"}
    assert plans["configurations"]["3d_fullres"]["features"][0] == 16  # the demo's narrower network
    # a second run reuses everything, the finished training run included
    r = run("demo", "--json", f"work_dir={tmp_path}", *short)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["train"]["already_finished"] is True


def test_plan_on_a_generated_anisotropic_dataset_with_overrides(tmp_path):
    from segpipe.demo_data import generate_demo_dataset

    root = generate_demo_dataset(
        tmp_path / "Aniso",
        num_cases=6,
        num_test=0,
        inplane_spacing=(0.7, 0.7),
        slice_spacing=(5.0, 5.0),
        fov_mm=(60.0, 60.0, 60.0),
    )
    work = tmp_path / "work"
    r = run("plan", str(root), f"work_dir={work}", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["anisotropic"] is True and "2.5d" in plan["configurations"]
    assert plan["configurations"]["3d_fullres"]["kernel_sizes"][0][0] == 1  # in-plane first kernels
    first = (work / "Aniso" / "plans.json").read_bytes()
    r = run(
        "plan",
        str(root),
        f"work_dir={work}",
        "gpu_memory_gb=24",
        "configurations=[3d_fullres]",
        "target_spacing=[4,1,1]",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert list(plan["configurations"]) == ["3d_fullres"]
    assert plan["configurations"]["3d_fullres"]["spacing"] == [4.0, 1.0, 1.0]
    assert plan["settings"]["gpu_memory_gb"] == 24
    r = run("plan", str(root), f"work_dir={work}")
    assert (work / "Aniso" / "plans.json").read_bytes() == first, "planning is deterministic"
    r = run("plan", str(root), f"work_dir={work}", "configurations=[4d]")
    assert r.returncode == 2 and "unknown configuration '4d'" in r.stderr
