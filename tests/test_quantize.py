"""int8 networks for OpenVINO: `segpipe export quantize=int8` calibrates each network on its fold's
training patches, checks it on its fold's validation cases, stores it checksummed with both Dice
figures, and refuses (writing nothing) when int8 loses more than the tolerance; `infer precision=int8`
runs it, and refuses a model without one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segpipe
from segpipe.cli import main
from segpipe.errors import ConfigError
from segpipe.inference.quantize import check_quantize
from segpipe.inference.runtimes import openvino_version

pytestmark = pytest.mark.skipif(
    openvino_version() is None or importlib.util.find_spec("nncf") is None,
    reason="the openvino and nncf packages are not installed",
)

TRAIN = {"epochs": 1, "iterations_per_epoch": 2, "val_batches": 1, "num_workers": 0, "seed": 3}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo dataset planned coarsely, preprocessed, fold 0 trained for 2 iterations."""
    root = tmp_path_factory.mktemp("quantize")
    data = segpipe.generate_demo_data(root / "demo")
    work = root / "work"
    segpipe.plan(
        data,
        work_dir=work,
        configurations=["3d_fullres"],
        target_spacing=[6.0, 3.0, 3.0],
        base_features=4,
        max_features_3d=16,
        num_workers=1,
    )
    segpipe.preprocess(data, work_dir=work, num_workers=1)
    segpipe.train(work_dir=work, fold=0, **TRAIN)
    return {"data": data, "work": work, "root": root}


@pytest.fixture(scope="module")
def int8_model(workspace: dict[str, Path]) -> Path:
    out = workspace["work"] / "model_int8"  # inside the workspace: a model folder there is not a dataset
    # a 2-iteration network is near chance: a tolerance of 1 lets any int8 network pass the check
    args = ["export", "-o", str(out), f"work_dir={workspace['work']}", "quantize=int8", "quantize_tolerance=1", "-q"]
    assert main(args) == 0
    return out


def test_export_stores_a_checked_int8_network_with_both_dice_figures(int8_model: Path) -> None:
    info = json.loads((int8_model / "model.json").read_text(encoding="utf-8"))
    member = info["members"][0]
    int8 = info["openvino"]["int8"][member["file"]]
    assert set(int8) >= {"files", "cases", "dice_fp32", "dice_int8", "tolerance", "calibration_patches"}
    assert int8["cases"] >= 1 and int8["tolerance"] == 1.0 and int8["calibration_patches"] == 64
    assert 0.0 <= int8["dice_int8"] <= 1.0 and 0.0 <= int8["dice_fp32"] <= 1.0
    files = sorted(int8_model / rel for rel in int8["files"])
    assert all(f.is_file() for f in files) and [f.suffix for f in files] == [".bin", ".xml"]
    assert "FakeQuantize" in files[1].read_text(encoding="utf-8")  # quantised, not the fp32 model again
    card = (int8_model / "README.md").read_text(encoding="utf-8")
    assert "quantised to int8" in card and f"{int8['dice_int8']:.4f}" in card


def test_infer_with_int8_runs_the_int8_network_and_says_so(int8_model: Path, workspace: dict[str, Path]) -> None:
    image = next((workspace["data"] / "imagesTs").glob("*.nii.gz"))
    labels = {}
    for precision in ("fp32", "int8"):
        out = workspace["root"] / f"pred_{precision}"
        args = [
            "infer",
            str(image),
            "-o",
            str(out),
            "-m",
            str(int8_model),
            "runtime=openvino",
            f"precision={precision}",
        ]
        assert main([*args, "-q"]) == 0
        report = json.loads(next(p for p in out.glob("*.json") if not p.name.endswith("_labels.json")).read_text())
        assert report["compute"]["precision"] == precision and report["identity"]["precision"] == precision
        labels[precision] = np.asarray(nib.load(next(out.glob("*.nii.gz"))).dataobj)
    assert labels["int8"].shape == labels["fp32"].shape
    assert float(np.mean(labels["int8"] == labels["fp32"])) > 0.5  # the same network, in other arithmetic


def test_a_changed_int8_network_is_refused(
    int8_model: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(int8_model, copy)
    info = json.loads((copy / "model.json").read_text(encoding="utf-8"))
    rel = next(r for r in next(iter(info["openvino"]["int8"].values()))["files"] if r.endswith(".bin"))
    with open(copy / rel, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    image = next((workspace["data"] / "imagesTs").glob("*.nii.gz"))
    assert main(["infer", str(image), "-o", str(tmp_path / "out"), "-m", str(copy), "precision=int8"]) != 0
    err = capsys.readouterr().err
    assert "checksum differs" in err and rel.split("/")[-1] in err
    assert not (tmp_path / "out").exists()


def test_int8_on_a_model_without_one_is_a_one_line_error(
    workspace: dict[str, Path], int8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the workspace's own runs (no int8 networks), found although a model folder was exported into it
    image = next((workspace["data"] / "imagesTs").glob("*.nii.gz"))
    out = tmp_path / "out"
    code = main(["infer", str(image), "-o", str(out), f"work_dir={workspace['work']}", "precision=int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and any("precision=int8" in line and "no int8 network" in line for line in err), err
    assert any("quantize=int8" in line for line in err)
    assert not out.exists() or not any(out.glob("*.nii.gz"))


def test_an_int8_network_that_loses_dice_is_refused_and_nothing_is_written(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.inference import quantize

    dice = iter([0.80, 0.78])  # fp32, then int8: 0.02 lost against a tolerance of 0.005
    monkeypatch.setattr(quantize, "_validation_dice", lambda *args: next(dice))
    out = workspace["root"] / "refused"
    with pytest.raises(ConfigError, match=r"int8 network's validation Dice 0\.7800 is 0\.0200 below .* 0\.8000"):
        segpipe.export(output=out, work_dir=str(workspace["work"]), quantize="int8")
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_quantize_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_quantize(None, 0.005) is None and check_quantize("int8", 0.005) == "int8"
    with pytest.raises(ConfigError, match="quantize=int4 is not a quantisation"):
        check_quantize("int4", 0.005)
    with pytest.raises(ConfigError, match="quantize_tolerance=-1"):
        check_quantize("int8", -1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else object())
    with pytest.raises(ConfigError, match="nncf package is not installed") as exc:
        check_quantize("int8", 0.005)
    assert "segpipe[cpu]" in (exc.value.hint or "")
