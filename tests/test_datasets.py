"""Dataset discovery for the three layouts, and validation of their descriptions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_case_folder, make_msd, make_nnunet, tiny_case

from segpipe import DataError, DatasetError, load_dataset, read_case
from segpipe.io.image import write_image


def edit_json(root, fn):
    path = root / "dataset.json"
    desc = json.loads(path.read_text())
    fn(desc)
    path.write_text(json.dumps(desc))


def test_msd_layout(tmp_path):
    ds = load_dataset(make_msd(tmp_path / "Task01_Tiny", channels=2))
    assert ds.layout == "msd" and ds.name == "Task01_Tiny"
    assert [c.id for c in ds.cases] == ["case_000", "case_001", "case_002"]
    assert [c.id for c in ds.test_cases] == ["case_099"]
    assert ds.channel_names == {0: "MR0", 1: "MR1"} and ds.labels == {0: "background", 1: "a", 2: "b"}
    data = read_case(ds.cases[1], ds)
    assert data.image.shape == (2, 6, 10, 12) and data.image.dtype == np.float32
    image, label, geo = tiny_case(1)
    np.testing.assert_allclose(data.image[1], image * 2)
    np.testing.assert_array_equal(data.label, label)
    assert data.geometry.same_grid(geo)


def test_hippocampus_is_msd(hippocampus):
    ds = load_dataset(hippocampus)
    assert ds.layout == "msd" and len(ds.cases) == 208 and len(ds.test_cases) == 130
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_nnunet_layout(tmp_path):
    ds = load_dataset(make_nnunet(tmp_path / "Dataset001_Tiny"))
    assert ds.layout == "nnunet"
    assert [c.id for c in ds.cases] == ["pt00", "pt01", "pt02"]
    assert [p.name for p in ds.cases[0].images] == ["pt00_0000.nii.gz", "pt00_0001.nii.gz"]
    assert ds.labels == {0: "background", 1: "a", 2: "b"} and ds.channel_names == {0: "CT", 1: "T2"}
    data = read_case(ds.cases[0], ds)
    np.testing.assert_allclose(data.image[1] - data.image[0], 1.0, atol=1e-4)


def test_case_folder_layout(tmp_path):
    ds = load_dataset(make_case_folder(tmp_path / "hospital"))
    assert ds.layout == "case-folder"
    assert [c.id for c in ds.cases] == ["patient0", "patient1", "patient2"]
    assert [c.id for c in ds.test_cases] == ["patient3"]
    data = read_case(ds.cases[2], ds)
    np.testing.assert_allclose(data.image[1], data.image[0] * 2)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["training"].append(dict(d["training"][0])), "duplicate case id 'case_000'"),
        (lambda d: d["training"][1].update(image="./imagesTr/nope.nii.gz"), r"training\[1\].image .*does not exist"),
        (
            lambda d: d["training"][0].update(label="../outside.nii.gz"),
            r"training\[0\].label '../outside.nii.gz' escapes",
        ),
        (
            lambda d: d["training"][0].update(label="/etc/passwd"),
            r"training\[0\].label '/etc/passwd' is an absolute path",
        ),
        (lambda d: d["training"][2].update(image=5), r"training\[2\].image must be a path string"),
        (lambda d: d.update(training={"a": 1}), '"training" must be a list'),
        (lambda d: d.update(labels={"0": "background", "2": "b"}), "without gaps"),
        (lambda d: d.update(labels={"0": "background", "1": "ignore"}), 'besides background and "ignore"'),
        (lambda d: d.update(labels={"0": "background", "1": "ignore", "2": "a"}), "the highest value"),
        (lambda d: d.update(modality={"0": 3}), "must be a string"),
    ],
)
def test_msd_description_errors_name_the_entry(tmp_path, mutate, match):
    root = make_msd(tmp_path / "ds")
    edit_json(root, mutate)
    with pytest.raises(DatasetError, match=match):
        load_dataset(root)


def test_nnunet_validation_errors(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    (root / "imagesTr" / "pt01_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case pt01 lacks channel file\(s\) pt01_0001.nii.gz"):
        load_dataset(root)
    shutil.rmtree(root)
    root = make_nnunet(tmp_path / "ds")
    (root / "labelsTr" / "pt02.nii.gz").unlink()
    with pytest.raises(DatasetError, match="label of case pt02 not found"):
        load_dataset(root)
    shutil.rmtree(root)
    root = make_nnunet(tmp_path / "ds")
    edit_json(root, lambda d: d.update(numTraining=7))
    with pytest.raises(DatasetError, match='"numTraining" is 7 but imagesTr holds 3'):
        load_dataset(root)
    edit_json(root, lambda d: d.update(numTraining=3, labels={"background": 0, "whole": [1, 2]}))
    # region labels need regions_class_order (nnU-Net's region-based training; see tests/test_regions.py)
    with pytest.raises(DatasetError, match='"regions_class_order" must list one label value per region'):
        load_dataset(root)


def test_case_folder_validation_errors(tmp_path):
    root = make_case_folder(tmp_path / "ds")
    edit_json(root, lambda d: d.update(cases=["patient0", "../ds"]))
    with pytest.raises(DatasetError, match=r"cases\[1\] '../ds' escapes"):
        load_dataset(root)
    edit_json(root, lambda d: d.update(cases=["patient0", "ghost"]))
    with pytest.raises(DatasetError, match="ghost does not exist"):
        load_dataset(root)
    edit_json(root, lambda d: d.update(cases=None, image=["t1.nii.gz", "t2.nrrd", "t3.nii.gz"]))
    with pytest.raises(DatasetError, match="names 3 files but channel_names declares 2"):
        load_dataset(root)


def test_missing_or_odd_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text('{"labels": {}}')
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        load_dataset(tmp_path / "empty")


def test_read_case_refuses_bad_data_with_case_and_file(tmp_path):
    root = make_msd(tmp_path / "ds")
    image, label, geo = tiny_case(1)
    label[0, 0, 0] = 7
    write_image(root / "labelsTr" / "case_001.nii.gz", label, geo)
    ds = load_dataset(root)
    with pytest.raises(DataError, match=r"case case_001: labelsTr/case_001.nii.gz: label values \[7\]"):
        read_case(ds.cases[1], ds)
