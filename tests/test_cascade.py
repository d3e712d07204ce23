"""The 3-D cascade: the previous stage's channels (by hand), its perturbations, the refusal without the
low-resolution folds, and the whole cascade trained and run on a large-volume synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data.cascade import attach_previous, perturb_channels, previous_channels
from segpipe.errors import StateError
from segpipe.planning import load_plan
from segpipe.training.cascade import next_stage_of, previous_predictions, save_next_stage


def test_previous_channels_by_hand():
    labels = np.array([[[0, 1, 2, 3]]])
    out = previous_channels(labels, [[1], [2], [3]])
    assert out.shape == (1, 3, 1, 4)
    assert out[0, :, 0].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    regions = previous_channels(labels, [[1, 2, 3], [2, 3], [3]])
    assert regions[0, :, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_attach_previous_moves_the_second_label_channel_into_the_image():
    image = torch.zeros((2, 1, 4, 4, 4))
    label = torch.zeros((2, 2, 4, 4, 4), dtype=torch.uint8)
    label[:, 0, 0] = 1  # the reference
    label[:, 1, 1] = 2  # the previous stage's prediction
    batch = attach_previous({"image": image, "label": label, "previous_channels": [[1], [2]]}, perturb=False)
    assert batch["image"].shape == (2, 3, 4, 4, 4) and batch["label"].shape == (2, 1, 4, 4, 4)
    assert batch["image"][:, 1].sum() == 0 and bool((batch["image"][:, 2, 1] == 1).all())
    assert int(batch["image"][:, 2].sum()) == 2 * 16
    assert bool((batch["label"][:, 0, 0] == 1).all()) and "previous_channels" not in batch


def test_perturbations_keep_channels_one_hot_and_change_them():
    rng = np.random.default_rng(0)
    onehot = np.zeros((16, 2, 12, 12, 12), dtype=np.float32)
    onehot[:, 0, 2:6, 2:6, 2:6] = 1
    onehot[:, 1, 7:10, 7:10, 7:10] = 1
    onehot[:, 1, 1, 10, 10] = 1  # a small second component
    before = onehot.copy()
    perturb_channels(onehot, rng)
    assert set(np.unique(onehot).tolist()) <= {0.0, 1.0}
    assert (onehot.sum(1) <= 1).all()  # never two classes on one voxel
    changed = [(onehot[b] != before[b]).any() for b in range(16)]
    assert 3 <= sum(changed) < 16  # p = 0.4 and 0.2 per sample: some change, not all


def test_missing_lowres_folds_are_refused(tmp_path):
    class FakePlan:
        configurations = {"3d_lowres": None, "3d_cascade_fullres": None}

        def previous_stage(self, name):
            return "3d_lowres" if name == "3d_cascade_fullres" else None

    runs = tmp_path / "runs"
    folder = runs / "3d_lowres" / "fold_0" / "next_stage"
    folder.mkdir(parents=True)
    np.save(folder / "a.npy", np.zeros((2, 2, 2), np.uint8))
    assert previous_predictions(runs, FakePlan(), "3d_cascade_fullres", ["a"]) == {"a": folder / "a.npy"}
    assert next_stage_of(FakePlan(), "3d_lowres") == "3d_cascade_fullres"
    with pytest.raises(
        StateError, match=r"needs the 3d_lowres predictions of every case; 2 case\(s\) have none"
    ) as exc:
        previous_predictions(runs, FakePlan(), "3d_cascade_fullres", ["a", "b", "c"])
    assert "fold_0" in exc.value.message and "segpipe train config=3d_lowres fold=0" in exc.value.hint


@pytest.fixture(scope="module")
def cascade_work(tmp_path_factory):
    """A synthetic dataset planned with 3d_lowres and the cascade, 3d_lowres trained on all five folds, the
    cascade on fold 0. A small GPU budget keeps the 3d_fullres patch small; ``lowres_threshold=0.9`` plans
    3d_lowres on images only ~2.5× the patch (nnU-Net's 0.25 needs 4×, and a CPU test needs small images)."""
    import segpipe
    from segpipe.demo_data import generate_demo_dataset

    tmp = tmp_path_factory.mktemp("cascade")
    data = generate_demo_dataset(
        tmp / "Big",
        num_cases=5,
        num_test=1,
        fov_mm=(64.0, 72.0, 72.0),
        inplane_spacing=(1.0, 1.0),
        slice_spacing=(1.0, 1.0),
    )
    work = tmp / "work"
    segpipe.plan(
        data,
        work_dir=work,
        gpu_memory_gb=1.05,
        base_features=4,
        max_features_3d=16,
        lowres_threshold=0.9,
        configurations=["3d_fullres", "3d_lowres", "3d_cascade_fullres"],
    )
    short = {"epochs": 1, "iterations_per_epoch": 2, "val_batches": 1, "work_dir": work}
    with pytest.raises(StateError, match="needs the 3d_lowres predictions"):
        segpipe.train(config="3d_cascade_fullres", fold=0, **short)
    for fold in range(5):
        segpipe.train(config="3d_lowres", fold=fold, **short)
    segpipe.train(config="3d_cascade_fullres", fold=0, **short)
    return data, work / "Big"


@pytest.mark.slow
def test_cascade_plan_and_next_stage_predictions(cascade_work):
    _data, root = cascade_work
    plan = load_plan(root / "plans.json")
    assert plan.previous_stage("3d_cascade_fullres") == "3d_lowres"
    assert plan.config("3d_cascade_fullres").data_identifier == plan.config("3d_fullres").data_identifier
    assert plan.network_channels("3d_cascade_fullres") == 1 + 3
    from segpipe.preprocessing import Cache

    fullres = Cache.for_configuration(root.parent, plan, "3d_cascade_fullres", dataset="Big")
    files = previous_predictions(root / "runs", plan, "3d_cascade_fullres", fullres.cases())
    assert len(files) == 5
    for case, path in files.items():  # each on the full-resolution grid of its case
        assert np.load(path).shape == tuple(fullres.properties(case)["shape_after_resample"])


@pytest.mark.slow
def test_next_stage_prediction_is_the_lowres_prediction_on_the_fullres_grid(cascade_work, tmp_path):
    """save_next_stage by hand: softmax, linear resampling to the full-resolution grid, argmax."""
    from segpipe.preprocessing import Cache, resample

    _data, root = cascade_work
    plan = load_plan(root / "plans.json")
    lowres = Cache.for_configuration(root.parent, plan, "3d_lowres", dataset="Big")
    fullres = Cache.for_configuration(root.parent, plan, "3d_fullres", dataset="Big")
    case = lowres.cases()[0]
    shape = fullres.properties(case)["shape_after_resample"]
    rng = np.random.default_rng(0)
    grid = lowres.properties(case)["shape_after_resample"]
    logits = torch.from_numpy(rng.normal(size=(4, *grid)).astype(np.float32))
    out = save_next_stage(plan, "3d_cascade_fullres", logits, lowres.properties(case), tmp_path / "x.npy")
    probs = torch.softmax(logits, 0).numpy()
    expected = resample(probs, shape, kind="linear").argmax(0)
    np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.slow
def test_cascade_inference_runs_both_stages(cascade_work, tmp_path):
    """The cascade model holds the lowres folds for its first stage; its extra channels are the lowres
    prediction on the cascade's grid."""
    import segpipe
    from segpipe.inference import cascade as stage

    data, root = cascade_work
    predictor = segpipe.Predictor.from_workspace(
        root.parent, "Big", configs="3d_cascade_fullres", tta=False, runtime="torch"
    )
    members = sorted((m.configuration, m.fold) for m in predictor.model.members)
    assert members == [("3d_cascade_fullres", "0")] + [("3d_lowres", str(f)) for f in range(5)]
    seen = {}
    original = stage.with_previous_stage

    def spy(pred, image, geo, configuration, grid, *, name, props=None):
        out = original(pred, image, geo, configuration, grid, name=name, props=props)
        seen["grid"], seen["out"] = grid, out
        return out

    stage_module = __import__("segpipe.inference.predictor", fromlist=["with_previous_stage"])
    stage_module.with_previous_stage = spy
    try:
        image = next((data / "imagesTs").glob("*.nii.gz"))
        prediction = predictor.predict(str(image))
    finally:
        stage_module.with_previous_stage = original
    grid, out = seen["grid"], seen["out"]
    assert out.shape == (grid.shape[0] + 3, *grid.shape[1:])
    np.testing.assert_array_equal(out[: grid.shape[0]], grid)
    extra = out[grid.shape[0] :]
    assert set(np.unique(extra).tolist()) <= {0.0, 1.0} and (extra.sum(0) <= 1).all()
    assert prediction.label.shape == tuple(prediction.geometry.shape)
    result = segpipe.find_best(work_dir=root.parent, dataset="Big")
    assert any(c["configurations"] == ["3d_cascade_fullres"] for c in result["candidates"])
    assert json.loads(Path(result["path"]).read_text())["cases"] >= 1
