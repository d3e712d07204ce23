"""What ``run_planning`` leaves in the workspace: plans.json, plan_summary.md, dataset_report.png."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from segpipe.demo_data import generate_demo_dataset
from segpipe.errors import ConfigError, StateError
from segpipe.io.datasets import load_dataset
from segpipe.planning import PlanSettings, make_plan, plan_summary_markdown, run_planning, write_dataset_report
from segpipe.planning.report import REPORT_KEY_FIELD, png_text, report_key
from segpipe.workspace import Workspace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated dataset (MSD layout, 4 labelled anisotropic cases, 3 foreground classes)."""
    return generate_demo_dataset(
        tmp_path_factory.mktemp("plan_outputs") / "Demo", num_cases=4, num_test=0, fov_mm=(40.0, 48.0, 48.0)
    )


@pytest.fixture(scope="module")
def planned(demo: Path, tmp_path_factory: pytest.TempPathFactory):
    ds = load_dataset(demo)
    entry = Workspace.at(tmp_path_factory.mktemp("work")).dataset(ds.name)
    return entry, run_planning(ds, entry, PlanSettings(), num_workers=1)


def test_plan_writes_every_artefact_where_the_workspace_says(planned, demo):
    entry, result = planned
    assert result.plans_path == entry.plans_path and result.fingerprint_path == entry.fingerprint_path
    assert (
        result.plan_summary_path == entry.plan_summary_path and result.dataset_report_path == entry.dataset_report_path
    )
    for path in (entry.plans_path, entry.fingerprint_path, entry.plan_summary_path, entry.dataset_report_path):
        assert path.is_file() and path.stat().st_size > 0
    assert result.paths() == {
        "plans_path": str(entry.plans_path),
        "fingerprint_path": str(entry.fingerprint_path),
        "plan_summary_path": str(entry.plan_summary_path),
        "dataset_report_path": str(entry.dataset_report_path),
    }
    assert not [p.name for p in entry.root.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries
    assert (entry.source() or {}).get("path") == str(demo.resolve())  # the workspace entry is claimed
    plan, plans_path = result  # still unpacks as (plan, plans_path)
    assert plans_path == entry.plans_path and plan is result.plan


def test_summary_holds_the_table_of_plans_json(planned):
    entry, result = planned
    plans = json.loads(entry.plans_path.read_text())
    text = entry.plan_summary_path.read_text(encoding="utf-8")
    assert text.startswith(f"# Plan for {plans['dataset']}")
    assert "| configuration | network | spacing (mm) | patch | batch | stages | features | est. GPU GB |" in text
    assert plans["configurations"]  # the demo plans several configurations
    for name, cfg in plans["configurations"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == "×".join(map(str, cfg["patch_size"]))
        assert cells[4] == str(cfg["batch_size"]) and cells[5] == str(cfg["num_stages"])
        assert cells[7] == f"{round(cfg['estimated_gpu_bytes'] / 2**30, 2):.4g}"
    assert "- **cases**: 4 labelled" in text
    assert "organ" in text and "MRI" in text  # labels and channels
    assert plans["skipped"]  # the demo's patch covers the image: no 3d_lowres
    assert "## Not planned" in text
    for name, why in plans["skipped"].items():
        assert f"- **{name}**: {why}" in text
    assert plans["fingerprint_sha256"] in text


def test_report_is_a_sensible_png(planned):
    entry, _ = planned
    width, height = png_size(entry.dataset_report_path)
    assert 800 <= width <= 4000 and 500 <= height <= 4000
    from matplotlib.image import imread

    pixels = imread(entry.dataset_report_path)
    assert pixels.shape[:2] == (height, width) and pixels.shape[2] in (3, 4)
    rgb = pixels[::3, ::3, :3]
    assert (rgb < 0.9).mean() > 0.02  # something is drawn: not a blank page
    codes = (np.round(rgb * 255).astype(np.int64) * [65536, 256, 1]).sum(axis=-1)
    assert len(np.unique(codes)) > 20  # colours: histograms, points, text


def test_fingerprint_holds_what_the_report_draws(planned):
    entry, result = planned
    fp = json.loads(entry.fingerprint_path.read_text())
    hist = fp["foreground_intensity_per_channel"]["0"]["histogram"]
    assert len(hist["counts"]) == hist["bins"] and hist["range"][0] < hist["range"][1]
    assert (
        sum(hist["counts"]) + hist["below"] + hist["above"] == fp["foreground_intensity_per_channel"]["0"]["n_samples"]
    )
    assert all("class_voxels" in c and "spacing" in c and "shape_after_crop" in c for c in fp["cases"])


def test_report_kept_when_unchanged_and_redrawn_when_not(planned, tmp_path):
    entry, result = planned
    fp = json.loads(entry.fingerprint_path.read_text())
    key = png_text(entry.dataset_report_path)[REPORT_KEY_FIELD]
    assert key == report_key(fp, result.plan)
    copy = tmp_path / "report.png"
    copy.write_bytes(entry.dataset_report_path.read_bytes())
    os.utime(copy, ns=(0, 0))
    write_dataset_report(copy, fp, result.plan)  # same data: kept as it is
    assert copy.stat().st_mtime_ns == 0
    other = make_plan(fp, PlanSettings(target_spacing=[2.0, 1.0, 1.0]))
    write_dataset_report(copy, fp, other)  # the target spacing is drawn: redrawn
    assert copy.stat().st_mtime_ns != 0 and png_text(copy)[REPORT_KEY_FIELD] == report_key(fp, other) != key
    os.utime(copy, ns=(0, 0))
    write_dataset_report(copy, fp, other, force=True)
    assert copy.stat().st_mtime_ns != 0
    assert png_text(tmp_path / "missing.png") == {} and png_text(entry.plan_summary_path) == {}


def test_report_and_summary_from_a_sparse_fingerprint(tmp_path):
    """A fingerprint without histograms or per-case classes (older or hand-written) still draws."""
    fp = {
        "dataset": "hand",
        "channel_names": {"0": "CT", "1": "PET", "2": "T1", "3": "T2"},
        "labels": {"0": "background", "1": "tumour"},
        "median_relative_size_after_crop": 1.0,
        "foreground_intensity_per_channel": {
            "0": {"mean": 40.0, "std": 30.0, "percentile_00_5": -50.0, "percentile_99_5": 200.0}
        },
        "cases": [{"spacing": [2.0, 0.9, 0.9], "shape_after_crop": [60, 200, 200]} for _ in range(5)],
    }
    plan = make_plan(fp, PlanSettings(configurations=["3d_fullres"]))
    out = write_dataset_report(tmp_path / "r.png", fp, plan)
    width, height = png_size(out)
    assert width > 800 and height > 800  # two rows of channel panels under the dataset row
    text = plan_summary_markdown(plan, fp)
    assert "| 3d_fullres |" in text and "| 2d |" not in text and "- **cases**: 5 labelled" in text
    write_dataset_report(tmp_path / "empty.png", {"dataset": "nothing"})  # nothing to draw, still a picture
    assert png_size(tmp_path / "empty.png")[0] > 0


def test_a_different_dataset_under_the_same_name_is_refused_before_reading(planned, demo, tmp_path):
    entry, _ = planned
    other = tmp_path / "elsewhere" / demo.name
    other.parent.mkdir()
    shutil.copytree(demo, other)
    before = entry.fingerprint_path.read_bytes()
    with pytest.raises(StateError, match="already holds a dataset named") as exc:
        run_planning(load_dataset(other), entry, PlanSettings(), num_workers=1)
    assert "dataset_name=" in (exc.value.hint or "")
    assert entry.fingerprint_path.read_bytes() == before


def test_bad_setting_or_workspace_fails_before_the_fingerprint(demo, tmp_path):
    ds = load_dataset(demo)
    ws = Workspace.at(tmp_path / "work")
    with pytest.raises(ConfigError, match="unknown configuration"):
        run_planning(ds, ws, PlanSettings(configurations=["3d"]), num_workers=1)
    assert not ws.dataset(ds.name).fingerprint_path.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="is a file"):
        run_planning(ds, blocker, PlanSettings(), num_workers=1)
