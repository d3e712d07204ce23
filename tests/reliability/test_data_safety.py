"""Reliability: a user's data is never written over, and a result is never taken from another model.

Each test is one case; its docstring's first line says the behaviour. Models are small: the
``tiny_model`` fixture (random weights) where only what happens around the network matters, and a
workspace trained for two iterations where a retrained fold must be told apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import segpipe
from segpipe import cli
from segpipe.checkpoint import save_checkpoint
from segpipe.inference.model import Member, Model, export_model, load_model_folder
from segpipe.networks import build_network

TRAIN = {"epochs": 1, "iterations_per_epoch": 2, "val_batches": 1, "num_workers": 0}


def _tree(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``root`` (links followed), and each folder."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel] = "folder"
    return out


def _json_out(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_an_output_folder_that_is_an_input_is_refused_before_anything_is_written(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer` refuses (exit 2), before writing anything, an output folder that is the input folder (also through a link or `..`), inside a DICOM series or a plain input folder, or whose label map would replace an input file."""
    model, good = tiny_model
    same = tmp_path / "io" / "same"
    same.mkdir(parents=True)
    shutil.copy(good, same / "h1.nii.gz")
    (tmp_path / "link").symlink_to(same)
    dicom = tmp_path / "series"
    dicom.mkdir()
    from segpipe.geometry import Geometry
    from segpipe.io.dicom.writer import write_dicom_series

    write_dicom_series(
        dicom, np.random.default_rng(0).normal(100, 10, (8, 16, 16)).astype(np.int16), Geometry((8, 16, 16), (3, 1, 1))
    )
    before = {"io": _tree(tmp_path / "io"), "series": _tree(dicom)}
    attempts = [
        (same, same),  # the very folder
        (same, tmp_path / "link"),  # the same folder through a link
        (same, same / ".." / "same"),  # … and through ..
        (same, same / "out"),  # inside a plain folder of inputs
        (same / "h1.nii.gz", same),  # a file's label map would take its name
        (dicom, dicom),
        (dicom, dicom / "seg"),  # a DICOM-SEG inside its own series
    ]
    for source, out in attempts:
        code = cli.main(["infer", str(source), "-o", str(out), "-m", str(model), "tta=false", "--json"])
        result = _json_out(capsys)
        assert code == 2, (source, out, result)
        assert "output folder" in result["error"]["message"] and "-o" in result["error"]["fix"], result
    assert {"io": _tree(tmp_path / "io"), "series": _tree(dicom)} == before  # nothing written or changed
    assert not (same / "out").exists() and not (dicom / "seg").exists()
    # the same input with its output beside it is segmented as usual
    assert (
        cli.main(["infer", str(same), "-o", str(tmp_path / "io" / "beside"), "-m", str(model), "tta=false", "-q"]) == 0
    )
    assert (tmp_path / "io" / "beside" / "h1.nii.gz").is_file()


def test_export_overwrite_replaces_only_an_earlier_model_folder(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """`export --overwrite` onto a folder that is not a segpipe model folder (a dataset, a workspace, a home folder) is refused, and the folder is untouched."""
    model, good = tiny_model
    loaded = load_model_folder(model)
    precious = tmp_path / "precious"
    precious.mkdir()
    shutil.copy(good, precious / "scan.nii.gz")
    before = _tree(precious)
    with pytest.raises(segpipe.SegpipeError, match="not a segpipe model folder") as info:
        export_model(loaded, precious, overwrite=True)
    assert info.value.exit_code == 2
    assert _tree(precious) == before
    again = export_model(loaded, tmp_path / "m", overwrite=False)
    export_model(loaded, again, overwrite=True)  # an earlier export is replaced
    assert load_model_folder(again).members[0].sha256 == loaded.members[0].sha256


def _model_copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def test_a_model_folder_checks_every_file_it_reads(
    tiny_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model folder whose `plans.json` or `postprocessing.json` was edited, or is a link leading outside it (as `model.json` may not be either), is refused naming the file; one exported before those checksums were kept loads with a warning."""
    model, _good = tiny_model
    info = json.loads((model / "model.json").read_text())
    assert set(info["files"]) == {"plans.json", "postprocessing.json"}
    # an edited plan: 2 mm spacing
    edited = _model_copy(model, tmp_path / "edited")
    plans = json.loads((edited / "plans.json").read_text())
    for cfg in plans["configurations"].values():
        cfg["spacing"] = [2.0, 2.0, 2.0]
    (edited / "plans.json").write_text(json.dumps(plans, indent=2))
    with pytest.raises(segpipe.SegpipeError, match=r"plans\.json: checksum differs"):
        load_model_folder(edited)
    # an edited post-processing decision
    post = _model_copy(model, tmp_path / "post")
    (post / "postprocessing.json").write_text(json.dumps({"largest_component": [1]}))
    with pytest.raises(segpipe.SegpipeError, match=r"postprocessing\.json: checksum differs"):
        load_model_folder(post)
    # links leading outside the folder
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("postprocessing.json", "plans.json", "model.json"):
        linked = _model_copy(model, tmp_path / f"linked_{name}")
        shutil.copy(linked / name, outside / name)
        (linked / name).unlink()
        (linked / name).symlink_to(outside / name)
        with pytest.raises(segpipe.SegpipeError, match="points outside the model folder"):
            load_model_folder(linked)
    # a model folder from before the checksums: read, with a warning saying what is not checked
    old = _model_copy(model, tmp_path / "old")
    info_old = dict(info)
    info_old.pop("files")
    info_old["format_version"] = 1
    (old / "model.json").write_text(json.dumps(info_old))
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        loaded = load_model_folder(old)
    assert loaded.members and "records no checksum of plans.json and postprocessing.json" in caplog.text
    # and one whose record lost a weight checksum is refused
    stripped = _model_copy(model, tmp_path / "stripped")
    info_stripped = json.loads((stripped / "model.json").read_text())
    info_stripped["members"][0].pop("sha256")
    (stripped / "model.json").write_text(json.dumps(info_stripped))
    with pytest.raises(segpipe.SegpipeError, match="has no checksum"):
        load_model_folder(stripped)


def test_a_changed_model_redoes_finished_cases_instead_of_keeping_old_predictions(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished `infer` batch run again after the model's weights changed (retrained, exported again over the same folder) segments every case again; each report names the weights' and the plan's checksums."""
    model, good = tiny_model
    mine = _model_copy(model, tmp_path / "model")
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(good, cases / "a.nii.gz")
    out = tmp_path / "out"
    args = ["infer", str(cases), "-o", str(out), "-m", str(mine), "tta=false", "--json"]
    assert cli.main(args) == 0
    first = _json_out(capsys)
    assert first["written"] == ["a"]
    report = json.loads((out / "a.json").read_text())
    loaded = load_model_folder(mine)
    assert report["identity"]["members"][0]["sha256"] == loaded.members[0].sha256
    assert report["identity"]["plan_sha256"] == loaded.plan_sha256()
    assert cli.main(args) == 0
    assert _json_out(capsys)["skipped"] == ["a"]  # the same model: already done
    # the model retrained: other weights, exported over the same folder
    torch.manual_seed(7)
    net = build_network(
        loaded.plan.config("3d_fullres"), loaded.plan.in_channels, loaded.plan.num_classes, deep_supervision=True
    )
    weights = tmp_path / "retrained.pt"
    save_checkpoint(weights, {"model": net.state_dict()})
    export_model(Model(loaded.plan, [Member("3d_fullres", "0", weights)]), mine, overwrite=True)
    assert cli.main(args) == 0
    again = _json_out(capsys)
    assert again["written"] == ["a"] and again["skipped"] == [], again
    assert (
        json.loads((out / "a.json").read_text())["identity"]["members"][0]["sha256"]
        != report["identity"]["members"][0]["sha256"]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo dataset (5 cases) planned coarsely and fold 0 trained for two iterations."""
    root = tmp_path_factory.mktemp("safety")
    from segpipe.demo_data import generate_demo_dataset

    data = generate_demo_dataset(root / "demo", num_cases=5, num_test=2)
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
    segpipe.train(work_dir=work, fold=0, seed=3, **TRAIN)
    return {"data": data, "work": work, "root": root}


def test_retraining_a_fold_redoes_the_cases_its_old_weights_segmented(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train fold=0 --overwrite seed=7`, then the same `infer` again: the cases are segmented with the new weights, not kept as "already done"."""
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    args = [
        "infer",
        str(trained["data"] / "imagesTs"),
        "-o",
        str(tmp_path / "out"),
        f"work_dir={work}",
        "tta=false",
        "--json",
    ]
    assert cli.main(args) == 0
    first = _json_out(capsys)
    assert first["written"] and not first["skipped"]
    assert (
        cli.main(
            ["train", "fold=0", f"work_dir={work}", "--overwrite", "seed=7", "-q"]
            + [f"{k}={v}" for k, v in TRAIN.items()]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(args) == 0
    again = _json_out(capsys)
    assert sorted(again["written"]) == sorted(first["written"]) and again["skipped"] == [], again


def test_infer_export_and_evaluate_never_change_an_input_file(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer`, `export` and `evaluate` leave every input file byte-identical (checksums before and after), and `export` and `evaluate` write only into their output folders."""
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    refs = data / "references"  # two reference label maps, and predictions of those two cases
    refs.mkdir()
    for ref in sorted((data / "labelsTr").glob("*.nii.gz"))[:2]:
        shutil.copy(ref, refs / ref.name)
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    for path in [data, work, *data.rglob("*"), *work.rglob("*")]:  # read-only, as on a shared drive
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        inputs, workspace = _tree(data), _tree(work)
        out = tmp_path / "pred"
        assert cli.main(["infer", str(data / "imagesTs"), "-o", str(out), f"work_dir={work}", "tta=false", "-q"]) == 0
        assert _tree(data) == inputs
        model = tmp_path / "model"
        assert cli.main(["export", "-o", str(model), f"work_dir={work}", "-q"]) == 0
        assert _tree(data) == inputs and _tree(work) == workspace
        # evaluate two label folders, writing its tables elsewhere
        preds = tmp_path / "preds"
        shutil.copytree(refs, preds)
        pred_tree = _tree(preds)
        scores = tmp_path / "scores"
        assert cli.main(["evaluate", str(preds), str(refs), "-o", str(scores), "-q"]) in (0, 1)
        assert _tree(data) == inputs and _tree(preds) == pred_tree
        assert (scores / "summary.json").is_file()
    finally:
        for path in [data, work, *data.rglob("*"), *work.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    capsys.readouterr()


def test_export_records_how_each_network_was_trained_and_warns_of_a_weak_or_unfinished_one(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`export` writes each network's epochs, training and validation cases, spacing and training time into `model.json` and the model card, and warns (terminal and card) when its validation Dice is low or its training stopped before the end."""
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        result = segpipe.export(output=tmp_path / "model", work_dir=work)
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    record = info["members"][0]["training"]
    assert record["epochs_done"] == 1 and record["epochs_planned"] == 1 and record["finished"] is True
    assert (record["training_cases"], record["validation_cases"]) == (4, 1)
    assert record["spacing_mm"] == [6.0, 3.0, 3.0] and record["training_seconds"] > 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| 1 of 1 × 2 iterations | 4 / 1 | 6 × 3 × 3 |" in card, card
    # two iterations of training: a low validation Dice, said on the terminal and in the card
    assert any("validation Dice" in w and "trained too little" in w for w in result["warnings"]), result
    assert "trained too little" in caplog.text and "Before use" in card
    # an unfinished run exported from its best weights: said too
    next(work.glob("*/runs/3d_fullres/fold_0/final.pt")).unlink()
    result = segpipe.export(output=tmp_path / "unfinished", work_dir=work, checkpoint="best")
    assert any("did not reach the end of its schedule" in w for w in result["warnings"]), result
