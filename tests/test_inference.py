"""Prediction: flip TTA, restore to the input's grid, post-processing, model folders, batch `infer`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import segpipe
from segpipe.errors import StateError, UsageError
from segpipe.geometry import Geometry
from segpipe.inference import (
    FlipTTA,
    Predictor,
    apply_postprocessing,
    default_output_dir,
    discover_inputs,
    export_model,
    flip_subsets,
    infer_cases,
    keep_largest_component,
    load_model_folder,
    predict_case_logits,
)
from segpipe.io.image import read_image, write_image
from segpipe.preprocessing import preprocess_arrays, restore, restore_argmax
from segpipe.preprocessing.spec import ChannelNorm, PreprocessSpec

CONFIG = "3d_fullres"
TRAIN = {"epochs": 1, "iterations_per_epoch": 2, "val_batches": 1, "num_workers": 0, "seed": 3}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------- TTA
def test_flip_subsets_cover_every_mirroring() -> None:
    assert flip_subsets(3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert len(flip_subsets(2)) == 4
    assert flip_subsets(3, axes=[2]) == [(), (4,)]
    with pytest.raises(ValueError):
        flip_subsets(2, axes=[2])


def test_flip_tta_averages_the_flipped_back_outputs() -> None:
    # a network that is not flip-equivariant: the output is the input times a ramp along the last axis
    ramp = torch.arange(4, dtype=torch.float32)

    def net(x: torch.Tensor) -> torch.Tensor:
        return x * ramp

    x = torch.ones(1, 1, 2, 3, 4)
    out = FlipTTA(net)(x)
    # flips of the last axis see the ramp reversed; the mean over the 8 flips is the ramp's mean
    # on that axis for 4 of them and the ramp for the other 4: (ramp + ramp[::-1]) / 2 = 1.5 everywhere
    assert torch.allclose(out, torch.full_like(x, 1.5))
    # without flipping the last axis, the ramp stays
    assert torch.allclose(FlipTTA(net, axes=[0, 1])(x), x * ramp)


def test_flip_tta_of_a_random_network_is_flip_equivariant() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 4, 6, 8)
    tta = FlipTTA(net)
    with torch.no_grad():
        a = tta(torch.flip(x, (4,)))
        b = torch.flip(tta(x), (4,))
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------- restore
def _props(shape=(9, 14, 11), spacing=(3.0, 0.9, 1.1), target=(1.5, 1.0, 1.0), transpose=(2, 0, 1)):
    rng = np.random.default_rng(1)
    image = np.zeros((1, *shape), dtype=np.float32)
    image[0, 1:-1, 2:-2, 1:-3] = rng.normal(5, 1, size=(shape[0] - 2, shape[1] - 4, shape[2] - 4))
    geo = Geometry(shape=shape, spacing=spacing)
    spec = PreprocessSpec(
        spacing=tuple(target[a] for a in transpose),
        normalization=(ChannelNorm.from_dict({"scheme": "zscore", "use_mask": False}),),
        transpose=transpose,
        separate_z_ratio=3.0,
        resample_slices=True,
    )
    grid, _, props = preprocess_arrays(image, None, geo, spec, 4)
    return grid, props, geo


def test_restore_argmax_equals_restore_then_argmax() -> None:
    grid, props, geo = _props()
    rng = np.random.default_rng(2)
    scores = rng.random((4, *grid.shape[1:])).astype(np.float32)
    scores /= scores.sum(0, keepdims=True)
    before = scores.copy()
    lean = restore_argmax(scores, props)
    full = restore(scores, props, is_label=False).argmax(0)
    assert lean.shape == geo.shape == full.shape
    assert lean.dtype == np.uint8
    np.testing.assert_array_equal(lean, full)
    np.testing.assert_array_equal(scores, before)  # the input is not modified
    # outside the crop box: background
    assert lean[0].max() == 0 and lean[-1].max() == 0


# ---------------------------------------------------------------------------- post-processing
def test_keep_largest_component_and_the_decision() -> None:
    label = np.zeros((5, 8, 8), dtype=np.uint8)
    label[1:3, 1:4, 1:4] = 1  # 18 voxels
    label[4, 6, 6] = 1  # 1 voxel, not touching
    label[0, 6:8, 0:2] = 2  # class 2: two pieces
    label[4, 0, 7] = 2
    keep = keep_largest_component(label == 1)
    assert keep.sum() == 18 and not keep[4, 6, 6]
    # a diagonal neighbour is connected (full connectivity)
    diag = np.zeros((3, 3, 3), dtype=bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert keep_largest_component(diag).sum() == 2
    out = apply_postprocessing(label, {"largest_component": [1]})
    assert (out == 1).sum() == 18 and out[4, 6, 6] == 0
    assert (out == 2).sum() == (label == 2).sum()  # class 2 untouched
    assert (label == 1).sum() == 19  # the input is not modified
    assert apply_postprocessing(label, None) is label
    with pytest.raises(segpipe.ConfigError):
        apply_postprocessing(label, {"largest_component": [0]})
    with pytest.raises(segpipe.ConfigError):
        apply_postprocessing(label, {"fill_holes": [1]})


# ---------------------------------------------------------------------------- inputs
def _nifti(path: Path, shape=(4, 5, 6), value: float = 1.0) -> Path:
    arr = np.full(shape, value, dtype=np.float32)
    arr[0, 0, 0] = value + 1
    write_image(path, arr, Geometry(shape=shape, spacing=(2.0, 1.0, 1.0)))
    return path


def test_discover_inputs_files_channels_and_case_folders(tmp_path: Path) -> None:
    single = _nifti(tmp_path / "scan.nii.gz")
    assert [(c.id, c.sources) for c in discover_inputs(single)] == [("scan", (single,))]
    assert default_output_dir(single) == tmp_path / "scan_segpipe"

    folder = tmp_path / "batch"
    folder.mkdir()
    _nifti(folder / "a_0000.nii.gz")
    _nifti(folder / "a_0001.nii.gz")
    _nifti(folder / "b_0000.nii.gz")
    _nifti(folder / "b_0001.nii.gz")
    (folder / "c").mkdir()
    _nifti(folder / "c" / "image.nrrd")
    (folder / "notes.txt").write_text("not an image")
    cases = discover_inputs(folder, in_channels=2)
    assert [c.id for c in cases] == ["a", "b", "c"]
    assert [p.name for p in cases[0].sources] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert default_output_dir(folder) == tmp_path / "batch_segpipe"

    gap = tmp_path / "gap"
    gap.mkdir()
    _nifti(gap / "a_0000.nii.gz")
    _nifti(gap / "a_0002.nii.gz")
    with pytest.raises(UsageError, match="without gaps"):
        discover_inputs(gap, in_channels=2)

    clash = tmp_path / "clash"
    clash.mkdir()
    _nifti(clash / "x.nii.gz")
    _nifti(clash / "x.mha")
    with pytest.raises(UsageError, match="several inputs would be written as x"):
        discover_inputs(clash)

    with pytest.raises(UsageError, match="no such file"):
        discover_inputs(tmp_path / "missing")
    with pytest.raises(UsageError, match="not an image"):
        discover_inputs(folder / "notes.txt")


# ---------------------------------------------------------------------------- a trained workspace
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo dataset planned coarsely (a 12×24×28 patch, 4-16 features), folds 0 and 1 trained
    for 2 iterations: weights that predict something, quickly."""
    root = tmp_path_factory.mktemp("infer")
    data = segpipe.generate_demo_data(root / "demo")
    work = root / "work"
    segpipe.plan(
        data,
        work_dir=work,
        configurations=[CONFIG],
        target_spacing=[6.0, 3.0, 3.0],
        base_features=4,
        max_features_3d=16,
        num_workers=1,
    )
    segpipe.preprocess(data, work_dir=work, num_workers=1)
    for fold in (0, 1):
        segpipe.train(work_dir=work, fold=fold, **TRAIN)
    return {"data": data, "work": work, "root": root}


def _predictor(trained: dict[str, Path], **options) -> Predictor:
    # PyTorch: these tests look inside the predictor (its networks, the window sums) as PyTorch runs them
    return Predictor.from_workspace(trained["work"], **{"overlap": 0.5, "device": "cpu", "runtime": "torch", **options})


class ThresholdNet(torch.nn.Module):
    """A voxel-wise stand-in for a trained network: class 1 where the normalised image is above 0.5
    (the bright organ and vessel of the demo), else background. Being voxel-wise, it commutes with
    every flip and shift, so geometry tests do not depend on what two training iterations learned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = x[:, :1] - 0.5
        low = torch.full_like(fg, -10.0)
        return torch.cat([torch.zeros_like(fg), fg, low, low], dim=1)


def _threshold_predictor(trained: dict[str, Path], **options) -> Predictor:
    predictor = _predictor(trained, folds=[0], **options)
    predictor.networks = {CONFIG: [ThresholdNet()]}
    return predictor


@pytest.mark.slow
def test_predictor_ensembles_the_trained_folds_and_answers_on_the_input_grid(trained: dict[str, Path]) -> None:
    predictor = _predictor(trained)
    assert [(m.configuration, m.fold) for m in predictor.model.members] == [(CONFIG, "0"), (CONFIG, "1")]
    image_path = trained["data"] / "imagesTs" / "demo_012.nii.gz"
    _image, geo = read_image(image_path)
    pred = predictor.predict(image_path)
    assert pred.geometry == geo and pred.label.shape == geo.shape
    assert pred.label.dtype == np.uint8 and set(np.unique(pred.label)) <= {0, 1, 2, 3}
    assert set(pred.volumes_ml()) == {v for k, v in pred.labels.items() if k > 0}
    # the same case given as an array with its geometry: the same answer
    array, geometry = read_image(image_path)
    again = predictor.predict(array, geometry)
    np.testing.assert_array_equal(again.label, pred.label)
    with pytest.raises(UsageError, match="needs its geometry"):
        predictor.predict(array)
    # probabilities on request: on the input grid, summing to one, their argmax the label
    with_probs = predictor.predict(image_path, probabilities=True)
    assert with_probs.probabilities is not None and with_probs.probabilities.dtype == np.float16
    assert with_probs.probabilities.shape == (4, *geo.shape)
    np.testing.assert_allclose(with_probs.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    agree = (with_probs.probabilities.argmax(0) == pred.label).mean()
    assert agree > 0.999  # float16 rounding may flip a near-tie
    # the folds averaged inside each window, rows handed over as they finish, equal the mean of
    # each fold's whole-image logits (the blend is linear)
    from segpipe.preprocessing import spec_from_plan

    image, _ = predictor.read(image_path)
    grid, _, _ = preprocess_arrays(image, None, geometry, spec_from_plan(predictor.plan, CONFIG), 4)
    each = [predict_case_logits(FlipTTA(n), grid, predictor.plan.config(CONFIG)) for n in predictor.networks[CONFIG]]
    rows: dict[int, torch.Tensor] = {}
    predictor._slide(grid, CONFIG, lambda r, b: rows.update({r + i: b[:, i].clone() for i in range(b.shape[1])}))
    together = torch.stack([rows[r] for r in range(grid.shape[1])], dim=1)
    torch.testing.assert_close(together, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-5)
    # one fold only
    single = _predictor(trained, folds=[1])
    assert [m.fold for m in single.model.members] == ["1"]
    with pytest.raises(StateError, match="fold 3"):
        _predictor(trained, folds=[3])


@pytest.mark.slow
def test_a_flipped_input_comes_back_in_its_own_geometry(trained: dict[str, Path], tmp_path: Path) -> None:
    """An image stored left-right flipped (the voxels reversed along x, the direction's x column negated,
    the origin moved to the other end) is the same object in space: with flip TTA, its prediction
    is the same label map in space, on the flipped file's own grid."""
    predictor = _threshold_predictor(trained)
    image_path = trained["data"] / "imagesTs" / "demo_012.nii.gz"
    image, geo = read_image(image_path)
    far_x = geo.index_to_world(np.array([[0, 0, geo.shape[2] - 1]]))[0]
    direction = np.asarray(geo.direction, dtype=float).reshape(3, 3).copy()
    direction[:, 0] *= -1
    flipped_geo = Geometry(
        shape=geo.shape, spacing=geo.spacing, origin=tuple(far_x), direction=tuple(direction.ravel())
    )
    flipped = tmp_path / "flipped.nii.gz"
    write_image(flipped, image[:, :, :, ::-1].copy(), flipped_geo)
    a = predictor.predict(image_path)
    b = predictor.predict(flipped)
    assert b.geometry.same_grid(read_image(flipped)[1])
    assert b.label.shape == a.label.shape
    assert a.label.any(), "the stand-in network found no bright voxel"
    back = b.label[:, :, ::-1]
    differ = int(np.count_nonzero(back != a.label))
    assert differ <= 0.002 * a.label.size, f"{differ} voxels differ in space"


@pytest.mark.slow
def test_export_makes_a_model_folder_that_predicts_the_same(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model"
    res = segpipe.export(work_dir=trained["work"], output=out)
    assert [m["fold"] for m in res["members"]] == ["0", "1"]
    assert (out / "model.json").is_file() and (out / "plans.json").is_file() and (out / "README.md").is_file()
    for fold in ("0", "1"):
        state = torch.load(out / "weights" / CONFIG / f"fold_{fold}.pt", weights_only=True)
        assert "optimizer" not in state and state["model"]
    with pytest.raises(UsageError, match="already exists"):
        segpipe.export(work_dir=trained["work"], output=out)
    image_path = trained["data"] / "imagesTs" / "demo_013.nii.gz"
    from_workspace = _predictor(trained).predict(image_path)
    from_folder = Predictor.from_model(out, device="cpu").predict(image_path)
    np.testing.assert_array_equal(from_folder.label, from_workspace.label)
    assert not list(tmp_path.glob(".model.tmp-*"))

    # a moved copy works without the workspace; a tampered one is refused
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, moved)
    assert load_model_folder(moved).members[0].path.is_relative_to(moved.resolve())
    weights = moved / "weights" / CONFIG / "fold_0.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(StateError, match="checksum"):
        load_model_folder(moved)
    # a model.json pointing outside the folder is refused
    info = json.loads((out / "model.json").read_text())
    info["members"][0]["file"] = "../../outside.pt"
    escaped = tmp_path / "escaped"
    shutil.copytree(out, escaped)
    (escaped / "model.json").write_text(json.dumps(info))
    with pytest.raises(StateError, match="outside the model folder"):
        load_model_folder(escaped)


@pytest.mark.slow
def test_a_crafted_pickle_in_a_model_folder_is_refused_not_run(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model"
    segpipe.export(work_dir=trained["work"], output=out, folds=[0])
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = out / "weights" / CONFIG / "fold_0.pt"
    torch.save({"model": Payload(), "format": "segpipe.training.checkpoint", "format_version": 1}, weights)
    info = json.loads((out / "model.json").read_text())
    info["members"][0]["sha256"] = None  # the checksum would catch it first; the loader must too
    (out / "model.json").write_text(json.dumps(info))
    with pytest.raises(StateError):
        Predictor.from_model(out, device="cpu")
    assert not marker.exists()


@pytest.mark.slow
def test_infer_cases_skips_finished_cases_and_reports_bad_ones(trained: dict[str, Path], tmp_path: Path) -> None:
    predictor = _predictor(trained, folds=[0], tta=False)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for cid in ("demo_012", "demo_013"):
        shutil.copy(trained["data"] / "imagesTs" / f"{cid}.nii.gz", inputs / f"{cid}.nii.gz")
    bad = np.full((6, 8, 8), np.nan, dtype=np.float32)
    write_image(inputs / "broken.nii.gz", bad, Geometry(shape=(6, 8, 8), spacing=(3.0, 1.0, 1.0)))
    out = tmp_path / "out"
    res = infer_cases(predictor, discover_inputs(inputs), out)
    assert res["written"] == ["demo_012", "demo_013"] and res["skipped"] == []
    assert [f["case"] for f in res["failed"]] == ["broken"] and "NaN" in res["failed"][0]["error"]
    assert not (out / "broken.nii.gz").exists() and not (out / "broken.json").exists()
    report = json.loads((out / "demo_012.json").read_text())
    assert report["case"] == "demo_012" and set(report["volume_ml"]) and report["label_map"] == "demo_012.nii.gz"
    label, geo = read_image(out / "demo_012.nii.gz")
    assert geo.same_grid(read_image(inputs / "demo_012.nii.gz")[1])
    stamp = (out / "demo_012.nii.gz").stat().st_mtime_ns

    again = infer_cases(predictor, discover_inputs(inputs), out)
    assert again["skipped"] == ["demo_012", "demo_013"] and again["written"] == []
    assert (out / "demo_012.nii.gz").stat().st_mtime_ns == stamp
    # other options are another result: redone
    other = infer_cases(_predictor(trained, folds=[0], tta=True), discover_inputs(inputs), out)
    assert other["written"] == ["demo_012", "demo_013"]
    forced = infer_cases(_predictor(trained, folds=[0], tta=True), discover_inputs(inputs), out, overwrite=True)
    assert forced["written"] == ["demo_012", "demo_013"]


# ---------------------------------------------------------------------------- the CLI
def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segpipe", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV},
        timeout=timeout,
    )


@pytest.mark.slow
def test_infer_and_export_on_the_command_line(trained: dict[str, Path], tmp_path: Path) -> None:
    work = trained["work"]
    r = _cli("infer", str(trained["data"]), f"work_dir={work}", "-o", str(tmp_path / "pred"), "tta=false", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["cases"] == ["demo_012", "demo_013"] and res["written"] == res["cases"]
    assert (tmp_path / "pred" / "demo_013.nii.gz").is_file()

    r = _cli("export", f"work_dir={work}", "-o", str(tmp_path / "model"), "folds=0")
    assert r.returncode == 0, r.stderr
    assert "segpipe infer INPUT -m" in r.stdout
    single = tmp_path / "one.nii.gz"
    shutil.copy(trained["data"] / "imagesTs" / "demo_012.nii.gz", single)
    r = _cli("infer", str(single), "-m", str(tmp_path / "model"), "tta=false", "device=cpu", "format=nrrd")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one_segpipe" / "one.nrrd").is_file()
    # a bad case: reported, the others written, a non-zero exit
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(single, mixed / "good.nii.gz")
    (mixed / "bad.nii.gz").write_bytes(b"not a nifti at all")
    r = _cli("infer", str(mixed), "-m", str(tmp_path / "model"), "tta=false")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "failed: bad" in r.stdout and (tmp_path / "mixed_segpipe" / "good.nii.gz").is_file()
    # usage errors
    r = _cli("export", f"work_dir={work}")
    assert r.returncode == 2 and "needs the model folder" in r.stderr
    r = _cli("infer", str(single), "-m", str(tmp_path / "model"), "overlap=1.5")
    assert r.returncode == 2 and "overlap" in r.stderr


def test_export_model_refuses_an_existing_target(tmp_path: Path) -> None:
    from segpipe.inference.model import Model

    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError):
        export_model(Model(plan=None, members=[]), target)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- DICOM in, DICOM-SEG out
@pytest.mark.slow
def test_a_dicom_series_and_its_nifti_give_the_same_labels_and_a_dicom_seg(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    from segpipe.io.dicom import write_dicom_series
    from segpipe.io.dicom_seg import read_dicom_seg

    image, geo = read_image(trained["data"] / "imagesTs" / "demo_012.nii.gz")
    series = tmp_path / "cases" / "patient_dicom"
    write_dicom_series(series, image[0], geo, modality="MR")
    nifti = tmp_path / "cases" / "patient_nifti.nii.gz"
    dicom_image, dicom_geo = read_image(series)
    write_image(nifti, dicom_image, dicom_geo)  # the NIfTI conversion of the series
    predictor = _threshold_predictor(trained)
    res = infer_cases(predictor, discover_inputs(tmp_path / "cases"), tmp_path / "out")
    assert res["written"] == ["patient_dicom", "patient_nifti"], res["failed"]
    a, a_geo = read_image(tmp_path / "out" / "patient_dicom.nii.gz")
    b, b_geo = read_image(tmp_path / "out" / "patient_nifti.nii.gz")
    assert a_geo.same_grid(b_geo) and a_geo.same_grid(dicom_geo)
    np.testing.assert_array_equal(a, b)

    seg = tmp_path / "out" / "patient_dicom_seg.dcm"
    report = json.loads((tmp_path / "out" / "patient_dicom.json").read_text())
    assert report["dicom_seg"] == seg.name
    assert a.max() == 1
    back, back_geo = read_dicom_seg(seg, series)
    assert back_geo.same_grid(dicom_geo)
    np.testing.assert_array_equal(back[0], a[0])
    assert not (tmp_path / "out" / "patient_nifti_seg.dcm").exists()
    beside = Path(sys.executable).parent / "dciodvfy"  # the dev install's dicom3tools
    dciodvfy = str(beside) if beside.is_file() else shutil.which("dciodvfy")
    if dciodvfy:
        r = subprocess.run([dciodvfy, str(seg)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, "\n".join(errors)


def test_write_dicom_seg_round_trip_on_a_synthetic_series(tmp_path: Path) -> None:
    """The DICOM-SEG writer on its own: a known label map on a 5-slice series reads back identical."""
    from segpipe.io.dicom import write_dicom_series
    from segpipe.io.dicom_seg import read_dicom_seg, write_dicom_seg

    geo = Geometry(shape=(5, 12, 10), spacing=(2.0, 0.8, 0.9), origin=(-10.0, 5.0, 30.0))
    image = np.random.default_rng(0).normal(100, 20, size=geo.shape).astype(np.float32)
    series = tmp_path / "series"
    write_dicom_series(series, image, geo, modality="MR")
    label = np.zeros(geo.shape, dtype=np.uint8)
    label[1:3, 2:6, 3:7] = 1
    label[3, 8:11, 1:4] = 2
    seg = write_dicom_seg(tmp_path / "seg.dcm", label, series, {0: "background", 1: "Anterior", 2: "Posterior"})
    back, back_geo = read_dicom_seg(seg, series)
    assert back_geo.same_grid(read_image(series)[1])
    np.testing.assert_array_equal(back[0], label)
    import pydicom

    ds = pydicom.dcmread(seg)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Anterior", "Posterior"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    with pytest.raises(UsageError, match="beyond"):
        write_dicom_seg(tmp_path / "bad.dcm", label * 2, series, {1: "a", 2: "b"})
    assert not (tmp_path / "bad.dcm").exists()


# ---------------------------------------------------------------------------- find-best
@pytest.mark.slow
def test_find_best_scores_configurations_ensembles_and_post_processing(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """A copy of the workspace gets a twin configuration whose saved validation predictions are the
    references themselves plus a stray blob of class 1 far from the rest: the twin wins, keeping the
    largest component of class 1 is adopted, and ``infer`` then defaults to the twin."""
    from segpipe.preprocessing import Cache

    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    entry = work / "demo"
    plans = json.loads((entry / "plans.json").read_text())
    plans["configurations"]["3d_twin"] = {**plans["configurations"][CONFIG], "name": "3d_twin"}
    (entry / "plans.json").write_text(json.dumps(plans))
    shutil.copytree(entry / "runs" / CONFIG, entry / "runs" / "3d_twin")
    cache = Cache(next((entry / "cache").iterdir()))
    for npy in (entry / "runs" / "3d_twin").glob("fold_*/validation/*.npy"):
        _image, label, _props = cache.load(npy.stem)
        probs = np.zeros((4, *label.shape), dtype=np.float16)
        for c in range(4):
            probs[c][np.asarray(label) == c] = 1
        probs[:, -1, -1, -1] = 0  # a stray one-voxel blob of class 1 in a corner (background there)
        probs[1, -1, -1, -1] = 1
        np.save(npy, probs)

    res = segpipe.find_best(work_dir=work)
    assert [c["configurations"] for c in res["candidates"]] == [[CONFIG], ["3d_twin"], [CONFIG, "3d_twin"]]
    assert res["configurations"] == ["3d_twin"]
    assert res["postprocessing"] == {"largest_component": [1]}
    assert res["mean_fg_dice_postprocessed"] == pytest.approx(1.0)
    assert res["mean_fg_dice"] < 1.0
    decision = json.loads((entry / "best_configuration.json").read_text())
    assert decision["configurations"] == ["3d_twin"]
    # the CV Dice of the real configuration matches its folds' own validation (same argmax, float16 softmax)
    per_case = []
    for fold in ("0", "1"):
        summary = json.loads((entry / "runs" / CONFIG / f"fold_{fold}" / "validation" / "summary.json").read_text())
        per_case += summary["metric_per_case"]
    assert res["cases"] == len(per_case)
    # infer without config= now uses the decision
    predictor = Predictor.from_workspace(work, device="cpu")
    assert predictor.model.configurations == ["3d_twin"]
    assert predictor.model.postprocessing == {"largest_component": [1]}


@pytest.mark.slow
def test_infer_then_evaluate_on_the_command_line(trained: dict[str, Path], tmp_path: Path) -> None:
    """The last two steps of the pipeline on the CLI: two training cases segmented, then scored."""
    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir()
    refs.mkdir()
    for cid in ("demo_000", "demo_001"):
        shutil.copy(trained["data"] / "imagesTr" / f"{cid}.nii.gz", images / f"{cid}.nii.gz")
        shutil.copy(trained["data"] / "labelsTr" / f"{cid}.nii.gz", refs / f"{cid}.nii.gz")
    r = _cli("infer", str(images), f"work_dir={trained['work']}", "-o", str(tmp_path / "pred"), "tta=false")
    assert r.returncode == 0, r.stderr
    r = _cli("evaluate", str(tmp_path / "pred"), str(refs), "-o", str(tmp_path / "eval"), f"images={images}", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n_cases"] == 2 and [c["case"] for c in summary["metric_per_case"]] == ["demo_000", "demo_001"]
    assert set(summary["mean"]) == {"0", "1", "2", "3"}
    for name in ("evaluation.csv", "summary.json", "dice_boxplot.png", "qc/demo_000.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    # the table on a terminal-less stdout, and a usage error for a missing folder
    r = _cli("evaluate", str(tmp_path / "pred"), str(refs), "-o", str(tmp_path / "eval2"))
    assert r.returncode == 0 and "foreground mean over 2 cases" in r.stdout, r.stderr
    r = _cli("evaluate", str(tmp_path / "pred"))
    assert r.returncode == 2 and "takes the predictions' folder and the references' folder" in r.stderr


@pytest.mark.slow
def test_openvino_runs_the_fold_ensemble_with_flips_as_pytorch_does(trained: dict[str, Path]) -> None:
    """Two trained folds, 8 flips each, averaged inside every window: OpenVINO's label map is PyTorch's
    (up to near-tie voxels), and its report says which runtime ran."""
    from segpipe.inference.runtimes import openvino_version

    if openvino_version() is None:
        pytest.skip("the openvino package is not installed")
    image_path = trained["data"] / "imagesTs" / "demo_012.nii.gz"
    torch_label = _predictor(trained).predict(image_path).label
    ov = _predictor(trained, runtime="openvino")
    ov_label = ov.predict(image_path).label
    assert len(ov.networks[CONFIG]) == 2 and all(n.source in ("converted", "cache") for n in ov.networks[CONFIG])
    assert ov.compute()["runtime"] == f"openvino {openvino_version()}" and ov.describe()["runtime"].startswith(
        "openvino"
    )
    assert float(np.mean(ov_label == torch_label)) >= 0.999
