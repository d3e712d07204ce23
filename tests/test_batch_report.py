"""The batch report, the flags and the overlays: checked by hand, end to end on the CLI, and in a browser."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from segpipe.colors import label_color
from segpipe.errors import DataError
from segpipe.geometry import Geometry
from segpipe.inference import flags
from segpipe.inference.flags import InputCheck, channel_modality, class_intensities, inspect_input, output_flags
from segpipe.io.image import read_image, write_image
from segpipe.reports import canonical, centre_of, three_planes

# ---------------------------------------------------------------- a training profile, by hand
PROFILE = {
    "channels": {
        "0": {
            "name": "MRI",
            "image": {
                "p01": {"min": 0.0, "median": 5.0, "max": 10.0},
                "p50": {"min": 100.0, "median": 150.0, "max": 200.0},
                "p99": {"min": 400.0, "median": 500.0, "max": 600.0},
            },
        }
    },
    "spacing": {"min": [0.9, 0.9, 0.9], "median": [1.0, 1.0, 1.0], "max": [1.2, 1.1, 1.1]},
    "classes": {
        "1": {"name": "a", "case_fraction": 1.0, "volume_ml": {"min": 1.0, "median": 2.0, "max": 3.0}},
        "2": {"name": "b", "case_fraction": 0.2, "border_case_fraction": 0.5},
    },
}
PLAN = SimpleNamespace(profile=PROFILE, channel_names={"0": "MRI"})
LABELS = {0: "background", 1: "a", 2: "b"}


def _uniform(lo: float, hi: float, shape=(20, 20, 20)) -> np.ndarray:
    """An image whose percentiles are known: evenly spread values from lo to hi."""
    return np.linspace(lo, hi, int(np.prod(shape)), dtype=np.float32).reshape(1, *shape)


def test_an_input_like_the_training_data_has_no_flag():
    # 1st/50th/99th percentiles of 0..600: 6, 300, 594; the training range widened by 0.25 × (600 - 0)
    # on each side: p50 in [-50, 350], p99 in [250, 750]
    check = inspect_input(_uniform(0, 600), Geometry(shape=(20, 20, 20), spacing=(1, 1, 1)), PLAN, strict=False)
    assert check.flags == []
    assert check.percentiles[0] == pytest.approx({"p01": 6.0, "p50": 300.0, "p99": 594.0}, abs=0.1)


def test_ct_intensities_given_to_an_mr_model_are_flagged_with_the_numbers():
    check = inspect_input(_uniform(-1000, 1000), Geometry(shape=(20, 20, 20), spacing=(1, 1, 1)), PLAN, strict=False)
    (flag,) = check.flags
    assert flag["kind"] == "intensity" and flag["channel"] == 0
    assert flag["percentiles"] == pytest.approx({"p01": -980.0, "p50": 0.0, "p99": 980.0}, abs=0.5)
    assert "-980/0/980" in flag["message"] and "0 to 10" in flag["message"]
    with pytest.raises(DataError, match="does not look like the model's training data: channel 0") as err:
        inspect_input(_uniform(-1000, 1000), Geometry(shape=(20, 20, 20), spacing=(1, 1, 1)), PLAN, strict=True)
    assert "strict=false" in err.value.hint


def _spread(lo: float, mid: float, hi: float) -> dict[str, float]:
    return {"min": lo, "median": mid, "max": hi}


def _reasons(image: np.ndarray, image_profile: dict) -> list[str]:
    plan = SimpleNamespace(profile={"channels": {"0": {"name": "x", "image": image_profile}}}, channel_names={"0": "x"})
    found = inspect_input(image, Geometry(shape=image.shape[1:], spacing=(1, 1, 1)), plan, strict=False).flags
    return found[0]["reasons"] if found else []


def test_sign_and_scale_rules_catch_what_a_wide_training_range_hides():
    # MR scaled very differently by scanner (the hippocampus cases' spread): the range rule alone lets CT in
    mr = {"p01": _spread(4, 37, 26085), "p50": _spread(49, 502, 291441), "p99": _spread(89, 874, 501104)}
    assert _reasons(_uniform(-1000, 1000), mr) == ["negative intensities, which no training image had"]
    assert _reasons(_uniform(0, 1), mr) == ["a 99th percentile over 4× away from the training images'"]  # 0.99 < 89 / 4
    assert _reasons(_uniform(0, 600), mr) == [] and _reasons(_uniform(0, 30), mr) == []  # 29.7 ≥ 22.25
    assert _reasons(_uniform(-20, 600), mr) == []  # noise around 0 (-14 ≥ -0.05 × 874) is not a negative image
    ct = {"p01": _spread(-1024, -1000, -900), "p50": _spread(-500, -100, 40), "p99": _spread(200, 800, 1500)}
    assert _reasons(_uniform(0, 600), ct) == [  # p01 6 > -900 + 0.25 × (1500 + 1024)
        "p01 outside the training range",
        "no negative intensities, which every training image had",
    ]
    assert _reasons(_uniform(-1024, 1000), ct) == []


def test_spacing_far_from_the_training_range_is_flagged_per_axis():
    image = _uniform(0, 600)
    # z 2.5 mm ≤ 1.2 × 2: in range; 3.0 > 2.4 is not
    assert inspect_input(image, Geometry(shape=(20, 20, 20), spacing=(2.4, 1, 1)), PLAN, strict=False).flags == []
    (flag,) = inspect_input(image, Geometry(shape=(20, 20, 20), spacing=(3.0, 1, 0.4)), PLAN, strict=False).flags
    assert flag["kind"] == "spacing" and flag["axes"] == ["z", "x"]
    # a single slice has no spacing along z to compare
    one = _uniform(0, 600, (1, 20, 20))
    assert inspect_input(one, Geometry(shape=(1, 20, 20), spacing=(9.0, 1, 1)), PLAN, strict=False).flags == []


def test_modality_from_channel_names_and_a_dicom_series_of_another_modality(monkeypatch):
    assert channel_modality("T2") == "MR" and channel_modality("MRI") == "MR" and channel_modality("CT") == "CT"
    assert channel_modality("non-contrast CT") == "CT" and channel_modality("image") is None
    assert channel_modality("CT MR") is None  # says two things: no expectation
    monkeypatch.setattr(flags, "source_modality", lambda source: "CT")
    kinds = [
        f["kind"]
        for f in inspect_input(
            _uniform(0, 600), Geometry(shape=(20, 20, 20), spacing=(1, 1, 1)), PLAN, strict=False
        ).flags
    ]
    assert kinds == ["modality"]


def test_a_model_without_a_profile_is_not_compared_and_says_so():
    plan = SimpleNamespace(profile={}, channel_names={"0": "MRI"})
    check = inspect_input(_uniform(-1000, 1000), Geometry(shape=(20, 20, 20), spacing=(1, 1, 1)), plan, strict=True)
    assert check.flags == [] and "no profile" in check.notes[0]


def test_output_flags_by_hand():
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1  # 1000 voxels of 1 mm³: 1 mL, inside [1 × 2/3, 3 × 1.5]
    assert output_flags(label, {"a": 1.0, "b": 0.0}, LABELS, PROFILE) == []  # b is rare in training: empty is fine
    assert [f["kind"] for f in output_flags(label, {"a": 0.0, "b": 0.0}, LABELS, PROFILE)] == ["empty"]
    (big,) = output_flags(label, {"a": 4.6, "b": 0.0}, LABELS, PROFILE)  # 4.6 > 3 × 1.5
    assert big["kind"] == "volume" and big["training"] == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert output_flags(label, {"a": 0.67, "b": 0.0}, LABELS, PROFILE) == []  # 0.67 ≥ 1 × 2/3
    speck = label.copy()
    speck[19, 19, 19] = 1  # a stray voxel in the corner: noise, not a structure cut off
    assert output_flags(speck, {"a": 1.0, "b": 0.0}, LABELS, PROFILE) == []
    edge = label.copy()
    edge[0:5, 10, 10] = 1  # the structure itself reaches the first slice: cut off?
    edge[19, 0, 0] = 2  # class b touched the border in half of the training cases: usual
    assert [(f["kind"], f["class"]) for f in output_flags(edge, {"a": 1.0, "b": 0.001}, LABELS, PROFILE)] == [
        ("border", "a")
    ]
    # without a profile every empty class is flagged and nothing is compared with training volumes
    kinds = [f["kind"] for f in output_flags(label, {"a": 50.0, "b": 0.0}, LABELS, {})]
    assert kinds == ["empty"]


def test_mean_intensity_per_class_by_hand_and_on_a_strided_copy():
    image = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, :2] = 1  # voxels 0 and 1
    label[3, 3, 3] = 2  # voxel 63
    full = InputCheck(preview=image, stride=1)
    assert class_intensities(full, label, LABELS) == {"a": [0.5], "b": [63.0]}
    strided = InputCheck(preview=np.ascontiguousarray(image[:, ::2, ::2, ::2]), stride=2)
    assert class_intensities(strided, label, LABELS) == {"a": [0.0]}  # voxel 1 and 63 fall between the stride


# ---------------------------------------------------------------- overlays
def _decode_png(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(indices [H, W], palette [N, 3]) of segpipe's palette PNG (filter 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(
            kind + data[pos + 8 : pos + 8 + n]
        )
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 3)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:], np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)


def test_canonical_turns_any_axis_order_to_patient_axes():
    vol = np.zeros((3, 4, 5), np.uint8)
    vol[0, 0, 0] = 1
    # identity direction: array (z, y, x) already runs I→S, A→P, R→L
    out, sp = canonical(vol, Geometry(shape=(3, 4, 5), spacing=(3.0, 2.0, 1.0)))
    assert out.shape == (3, 4, 5) and out[0, 0, 0] == 1 and sp == (3.0, 2.0, 1.0)
    # x flipped (index x runs towards the patient's right): the voxel at x=0 is the leftmost
    flipped = Geometry(shape=(3, 4, 5), spacing=(3.0, 2.0, 1.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    out, _ = canonical(vol, flipped)
    assert out[0, 0, 4] == 1
    # a sagittal stack: array axis 0 (ITK z) runs along the patient's x, axis 2 (ITK x) along y, axis 1 along -z
    sag = Geometry(shape=(3, 4, 5), spacing=(3.0, 2.0, 1.0), direction=(0, 0, 1, 1, 0, 0, 0, -1, 0))
    out, sp = canonical(vol, sag)
    assert out.shape == (4, 5, 3) and sp == (2.0, 1.0, 3.0)
    assert out[3, 0, 0] == 1  # array y=0 is the most superior row


def test_three_planes_keep_the_physical_aspect_and_the_label_colours():
    image = np.full((10, 10, 10), 50.0, np.float32)
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:7, 3:7, 3:7] = 2
    centre = centre_of(label, 2)
    assert centre is not None and all(3 <= c < 7 for c in centre)
    png = three_planes(image, label, (3.0, 1.0, 1.0), centre, window=(0.0, 100.0), values=[1, 2])
    index, palette = _decode_png(png)
    # axial 10 × 10 mm → 160 × 160; coronal and sagittal 30 mm tall, 10 mm wide → 160 × 53; 4-pixel gaps
    assert index.shape == (160, 160 + 4 + 53 + 4 + 53)
    colours = {tuple(int(c) for c in palette[i]) for i in np.unique(index)}
    assert label_color(2) in colours  # the outline in the label's own colour
    assert label_color(1) not in colours  # a class not predicted is not drawn
    assert len(png) < 50_000
    assert centre_of(label, 1) is None


# ---------------------------------------------------------------- a batch, on the command line
@pytest.fixture(scope="module")
def batch(tiny_model, tmp_path_factory):
    """One batch of the tiny model: a good case, its intensities as CT numbers, and a corrupt file."""
    from segpipe.cli import main

    model, image_path = tiny_model
    tmp = tmp_path_factory.mktemp("batch_report")
    inputs = tmp / "in"
    inputs.mkdir()
    image, geo = read_image(image_path)
    write_image(inputs / "good.nii.gz", image, geo)
    write_image(inputs / "ct_like.nii.gz", image * 4.0 - 1000.0, geo)
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp / "out"
    code = main(["infer", str(inputs), "-m", str(model), "-o", str(out), "--json", "runtime=torch", "tta=false"])
    return SimpleNamespace(code=code, out=out, inputs=inputs, model=model, tmp=tmp)


@pytest.mark.slow
def test_the_batch_report_lists_every_case_with_its_flags_and_overlays(batch):
    assert batch.code == 3  # one case failed
    out = batch.out
    html = (out / "report.html").read_text()
    for case in ("good", "ct_like", "broken"):
        assert f'id="case-{case}"' in html
    assert "Fix:" in html and "http://" not in html and "https://" not in html
    ct = json.loads((out / "ct_like.json").read_text())
    assert "intensity" in [f["kind"] for f in ct["flags"]]
    good = json.loads((out / "good.json").read_text())
    assert [f for f in good["flags"] if f["kind"] in ("intensity", "spacing", "modality")] == []
    for fig in good["figures"] + ct["figures"]:
        png = out / fig["file"]
        assert png.is_file() and png.stat().st_size < 50_000 and fig["file"] in html
    sidecar = json.loads((out / "good_labels.json").read_text())
    assert sidecar["label_map"] == "good.nii.gz" and sidecar["labels"][0]["value"] == 1
    assert not list(out.glob("broken*"))  # a failed case leaves none of its files


@pytest.mark.slow
def test_strict_fails_an_input_unlike_the_training_data(batch, caplog):
    from segpipe.cli import main

    out = batch.tmp / "strict"
    code = main(
        ["infer", str(batch.inputs / "ct_like.nii.gz"), "-m", str(batch.model), "-o", str(out)]
        + [
            "strict=true",
            "runtime=torch",
            "tta=false",
        ]
    )
    assert code == 3 and "does not look like the model's training data" in caplog.text
    assert not (out / "ct_like.nii.gz").exists()


@pytest.mark.slow
def test_a_stopped_batch_has_a_report_of_what_it_finished_and_the_rerun_completes_it(batch):
    from segpipe.api import infer

    out = batch.tmp / "stopped"
    calls = []

    def stop_after_first(message: str) -> None:
        calls.append(message)
        if message.startswith("[2/"):  # broken (failed), ct_like (written), then stopped before good
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer(batch.inputs, output=out, model=batch.model, log=stop_after_first, runtime="torch", tta=False)
    html = (out / "report.html").read_text()
    assert "1 segmented" in html and "1 failed" in html and "1 not yet segmented" in html
    res = infer(batch.inputs, output=out, model=batch.model, runtime="torch", tta=False)
    assert res["skipped"] == ["ct_like"] and res["written"] == ["good"]
    assert "0 not yet segmented" in (out / "report.html").read_text()


@pytest.mark.slow
def test_seg_nrrd_output_names_its_segments(batch):
    from segpipe.api import infer
    from segpipe.io.seg_nrrd import read_seg_nrrd_segments

    out = batch.tmp / "slicer"
    infer(batch.inputs / "good.nii.gz", output=out, model=batch.model, format="seg.nrrd", runtime="torch", tta=False)
    segments = read_seg_nrrd_segments(out / "good.seg.nrrd")
    labels = json.loads((out / "good.json").read_text())["labels"]
    assert [(s["value"], s["name"]) for s in segments] == [(int(k), v) for k, v in labels.items() if k != "0"]
    from segpipe.io.formats import case_id_of

    assert case_id_of(out / "good.seg.nrrd") == "good"  # so that evaluate pairs it with its reference
    _, geo = read_image(out / "good.seg.nrrd")
    _, src = read_image(batch.inputs / "good.nii.gz")
    assert geo.same_grid(src)


@pytest.mark.slow
def test_the_batch_report_works_offline_in_a_browser(batch):
    from browser import Browser, chromium_or_skip

    with Browser(chromium_or_skip(), offline=True) as browser:
        load = browser.open(batch.out / "report.html")
        assert load.console_errors == [] and load.external_requests == [] and load.failed_requests == []
        images = browser.images()
        assert images and all(img["natural_width"] > 0 for img in images)
        order = "Array.from(document.querySelectorAll('#cases tbody tr td:first-child')).map(td => td.textContent)"
        browser.click("#cases th:first-child")
        first = browser.evaluate(order)
        browser.click("#cases th:first-child")
        assert browser.evaluate(order) == list(reversed(first)) and sorted(first) == first


@pytest.mark.slow
def test_the_report_covers_every_case_of_its_folder_across_batches(batch):
    from segpipe.api import infer

    out = batch.tmp / "two_batches"
    infer(batch.inputs / "good.nii.gz", output=out, model=batch.model, runtime="torch", tta=False)
    res = infer(batch.inputs / "ct_like.nii.gz", output=out, model=batch.model, runtime="torch", tta=False)
    html = Path(res["report"]).read_text()
    assert 'id="case-good"' in html and 'id="case-ct_like"' in html and "1 done earlier" in html


@pytest.mark.slow
def test_a_200_case_report_opens_with_every_image(tmp_path, record_property):
    """The figure the README's benchmark gives (open time) is measured here and recorded, not asserted."""
    from browser import Browser, chromium_or_skip

    from segpipe.inference.batch_report import FIGURE_DIR, BatchReport

    exe = chromium_or_skip()
    rng = np.random.default_rng(0)
    image = rng.normal(300, 80, (36, 50, 36)).astype(np.float32)  # hippocampus-sized, noisy like MR
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 15:30, 10:20], label[20:28, 20:35, 12:22] = 1, 2
    pngs = [three_planes(image, label, (1, 1, 1), centre_of(label, v), window=(0, 600), values=[1, 2]) for v in (1, 2)]
    plan = SimpleNamespace(labels={"0": "background", "1": "Anterior", "2": "Posterior"})
    ids = [f"case_{i:03d}" for i in range(200)]
    page = BatchReport(tmp_path, ids, {"dataset": "hippocampus", "members": []}, plan)
    (tmp_path / FIGURE_DIR).mkdir()
    for i, case in enumerate(ids):
        figures = []
        for k, png in enumerate(pngs):
            (tmp_path / FIGURE_DIR / f"{case}.{k}.png").write_bytes(png)
            figures.append({"file": f"{FIGURE_DIR}/{case}.{k}.png", "class": plan.labels[str(k + 1)], "value": k + 1})
        volumes = {"Anterior": 1.5 + i / 1000, "Posterior": 1.4}
        flagged = [{"kind": "volume", "message": "Anterior: big"}] if i % 50 == 0 else []
        page.add(case, "written", {"volume_ml": volumes, "figures": figures, "flags": flagged, "seconds": 2.0}, None)
    report = page.write()
    assert max(p.stat().st_size for p in (tmp_path / FIGURE_DIR).iterdir()) < 50_000
    with Browser(exe, offline=True) as browser:
        load = browser.open(report)
        assert load.console_errors == [] and load.external_requests == []
        images = browser.images(timeout=60.0)
        assert len(images) == 400 and all(img["natural_width"] > 0 for img in images)
        browser.click("#cases th:nth-child(3)")  # Anterior mL: numbers sort as numbers
        col = "Array.from(document.querySelectorAll('#cases tbody tr td:nth-child(3)')).map(td => td.textContent)"
        assert browser.evaluate(col)[:2] == ["1.50", "1.50"] and browser.evaluate(col)[-1] == "1.70"
    record_property("report_open_ms", load.load_ms)
    print(f"200-case report: {report.stat().st_size / 1024:.0f} kB of HTML, opened in {load.load_ms:.0f} ms")


def test_source_modality_reads_the_series_header(tmp_path):
    from segpipe.inference.flags import source_modality
    from segpipe.io.dicom.writer import write_dicom_series

    image = np.arange(2 * 4 * 5, dtype=np.int16).reshape(2, 4, 5)
    write_dicom_series(tmp_path / "ct", image, Geometry(shape=(2, 4, 5), spacing=(2.0, 1.0, 1.0)), modality="CT")
    assert source_modality(tmp_path / "ct") == "CT"
    assert source_modality(next((tmp_path / "ct").iterdir())) == "CT"  # one file of it
    write_image(tmp_path / "x.nii.gz", image.astype(np.float32), Geometry(shape=(2, 4, 5), spacing=(1, 1, 1)))
    assert source_modality(tmp_path / "x.nii.gz") is None and source_modality(image) is None


def test_channel_names_of_an_input_dataset_against_the_model():
    from segpipe.inference.flags import channel_flags

    plan = SimpleNamespace(channel_names={"0": "MRI", "1": "T2"})
    assert channel_flags(None, plan) == [] and channel_flags(("mri", "t2 "), plan) == []
    (flag,) = channel_flags(("CT", "T2"), plan)
    assert flag["kind"] == "channels" and "channel 0 is 'CT', the model's 'MRI'" in flag["message"]
    assert channel_flags(("T1", "T2"), plan)[0]["expected"] == ["MRI", "T2"]  # another name, even of MR
