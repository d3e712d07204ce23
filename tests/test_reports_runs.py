"""The pages for people of a training run, of ``evaluate`` and of ``find-best``, on folders written
here by hand (a run folder's metrics.csv, progress.png, settings.json, validation and cache): the
tables hold the right numbers, the worst cases are the lowest-Dice ones, every image named exists and
is a PNG, nothing is fetched from elsewhere, and a run without validation gets a page that says so."""

from __future__ import annotations

import argparse
import json
import math
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segpipe.geometry import Geometry
from segpipe.io.image import write_image
from segpipe.preprocessing import Cache
from segpipe.reports import encode_png
from segpipe.training.run_report import write_run_report
from segpipe.workflows.evaluate import evaluate_folders
from segpipe.workflows.report import write_find_best_report
from segpipe.workspace import Workspace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = {1: "liver", 2: "tumour"}


# ---------------------------------------------------------------------------- reading a page
class Page(HTMLParser):
    """What a test looks at in a report: its tables (rows of ``data-v`` values), the ids of its
    elements, and every URL it names (img/script src, link/a href)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: set[str] = set()
        self.images: list[dict[str, str]] = []
        self.urls: list[tuple[str, str]] = []
        self._table: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self.tables[self._table][-1].append(a.get("data-v", ""))
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a:
                self.urls.append((tag, a[key]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None

    def rows(self, table_id: str) -> list[list[str]]:
        return [r for r in self.tables[table_id] if r]  # the header row holds no <td>


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    return width, height


def check_images_and_offline(page: Page, folder: Path) -> list[Path]:
    """Every image the page names exists beside it and is a valid PNG; no script, style or image is
    fetched from elsewhere. Returns the images' paths."""
    for tag, url in page.urls:
        assert "http" not in url.lower(), f"<{tag}> names {url}"
    files = []
    for img in page.images:
        path = folder / img["src"]
        png_size(path)
        files.append(path)
    return files


def close(cell: str, value: float) -> bool:
    return math.isclose(float(cell), value, rel_tol=0, abs_tol=1e-9)


# ---------------------------------------------------------------------------- a run folder by hand
SHAPE = (12, 16, 20)  # the cache grid (z, y, x)
#: the validation: case → Dice per class (None: both empty)
DICE = {
    "case_a": {1: 0.90, 2: 0.80},  # mean 0.85
    "case_b": {1: 0.50, 2: None},  # mean 0.50 (the empty class left out)
    "case_c": {1: 0.70, 2: 0.10},  # mean 0.40: the worst
    "case_d": {1: 0.95, 2: 0.65},  # mean 0.80
    "case_e": {1: None, 2: None},  # no value: never among the worst
}


def _label(shift: int = 0) -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[3:9, 4:12, 5 + shift : 15 + shift] = 1
    lab[5:7, 6:9, 7 + shift : 10 + shift] = 2
    return lab


def _probabilities(label: np.ndarray) -> np.ndarray:
    probs = np.zeros((3, *label.shape), dtype=np.float16)
    for c in range(3):
        probs[c][label == c] = 1
    return probs


def make_run(root: Path, *, cached: tuple[str, ...] = ("case_a", "case_b", "case_c", "case_d")) -> tuple[Path, Cache]:
    """``<root>/work/ds/runs/3d_fullres/fold_0`` with 12 epochs of metrics, curves, settings, the
    validation above (predictions saved for every case but case_b) and a cache holding ``cached``."""
    run = root / "work" / "ds" / "runs" / "3d_fullres" / "fold_0"
    (run / "validation").mkdir(parents=True)
    settings = {
        "configuration": "3d_fullres",
        "fold": "0",
        "settings": {"epochs": 12, "iterations_per_epoch": 5, "loss": "dice_ce", "loss_params": {}, "optim": "sgd"}
        | {"optim_params": {"momentum": 0.9}, "lr": 0.005, "batch_size": None, "seed": 7},
        "versions": {"segpipe": "0.1.0", "torch": "2.x"},
    }
    (run / "settings.json").write_text(json.dumps(settings))
    header = "epoch,train_loss,val_loss,dice_liver,dice_tumour,mean_fg_dice,ema_fg_dice,val_dice,val_dice_liver,val_dice_tumour,lr,seconds"
    rows = [
        f"{e},{1 - e / 20:.4f},{1 - e / 25:.4f},0.5,0.5,{e / 20:.4f},{e / 24:.4f},{'0.71' if e == 11 else ''},,,0.01,2.5"
        for e in range(12)
    ]
    (run / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    (run / "progress.png").write_bytes(encode_png(np.zeros((8, 10), dtype=np.uint8), np.zeros((1, 3), np.uint8)))
    per_case = [
        {"case": c, "metrics": {str(k): {"Dice": d, "TP": 1, "FP": 0, "FN": 0} for k, d in dice.items()}}
        for c, dice in DICE.items()
    ]
    summary = {"metric_per_case": per_case, "mean": {}, "foreground_mean": {"Dice": 0.7}}
    (run / "validation" / "summary.json").write_text(json.dumps(summary))
    (run / "validation" / "dice_per_case.csv").write_text("case,dice_1_liver,dice_2_tumour,foreground_mean\n")
    cache = Cache(root / "work" / "ds" / "cache" / "3d_fullres")
    rng = np.random.default_rng(0)
    for i, case in enumerate(DICE):
        if case != "case_b":  # its softmax was not kept
            np.save(run / "validation" / f"{case}.npy", _probabilities(_label(shift=i % 3)))
        if case in cached:
            props = {
                "original_geometry": Geometry(shape=(20, 16, 12), spacing=(1.0, 0.8, 2.5)).to_dict(),
                "transpose": [2, 1, 0],  # the cache's axes: the original's reversed
                "spacing": [2.5, 0.8, 1.0],
            }
            cache.write(case, rng.normal(0, 1, (1, *SHAPE)).astype(np.float32), _label(), props)
    return run, cache


def test_run_report_tables_worst_cases_and_images(tmp_path: Path) -> None:
    run, cache = make_run(tmp_path, cached=("case_a", "case_c", "case_d"))  # case_e: gone from the cache
    stale = run / "report_files" / "9.old.0.pred.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    said: list[str] = []
    path = write_run_report(run, cache=cache, say=said.append)
    assert path == run / "report.html" and said == [f"report: {path}"]
    text = path.read_text()
    page = Page(text)

    # the validation table: one row per case, its Dice per class (empty: no value) and mean by hand
    rows = {r[0]: r[1:] for r in page.rows("validation")}
    assert list(rows) == list(DICE)
    for case, dice in DICE.items():
        values = [d for d in dice.values() if d is not None]
        expected = [dice[1], dice[2], sum(values) / len(values) if values else None]
        for cell, value in zip(rows[case], expected, strict=True):
            assert cell == "" if value is None else close(cell, value), (case, rows[case])
    assert "liver Dice" in text and "tumour Dice" in text  # names from dice_per_case.csv's header

    # the worst cases: the three lowest means, each with its section; case_e (no value) is not one
    assert {"case-case_c", "case-case_b", "case-case_d"} <= page.ids and "case-case_a" not in page.ids
    assert text.index('id="case-case_c"') < text.index('id="case-case_b"') < text.index('id="case-case_d"')
    assert "No saved prediction of this case" in text  # case_b
    images = check_images_and_offline(page, run)
    names = sorted(p.name for p in images if p.parent.name == "report_files")
    # case_c (worst) and case_d over their image: prediction and reference through each structure's centre
    assert names == sorted(
        f"{i}.{c}.{k}.{kind}.png" for i, c in ((0, "case_c"), (2, "case_d")) for k in (0, 1) for kind in ("pred", "ref")
    )
    assert sorted(p.name for p in (run / "report_files").iterdir()) == names  # the stale image is gone
    assert run / "progress.png" in images

    # the curves: the last 10 epochs of 12 (counted from 1, as the curves do), with their numbers
    epochs = page.rows("epochs")
    assert [r[0] for r in epochs] == [str(e) for e in range(3, 13)]
    assert close(epochs[-1][4], round(11 / 24, 4)) and close(epochs[-1][5], 0.71)
    assert (
        "12 epoch(s) trained of 12; best EMA pseudo-Dice 0.4583 after epoch 12; last full-case validation Dice 0.7100 after epoch 12"
        in text
    )
    # the settings and versions
    assert "dice_ce (" in text and "ce_weight" in text and "momentum 0.9" in text and "lr 0.005" in text
    assert "the plan&#x27;s" in text and "2.x" in text


def test_run_report_without_the_cache_and_without_validation(tmp_path: Path) -> None:
    run, _cache = make_run(tmp_path, cached=())
    said: list[str] = []
    path = write_run_report(run, say=said.append)  # no plan, no cache: the prediction alone
    assert path is not None
    text = path.read_text()
    assert text.count("the prediction is shown alone") == 2  # case_c and case_d; case_b has no prediction
    files = check_images_and_offline(Page(text), run)
    assert all(".ref." not in p.name for p in files if p.parent.name == "report_files")

    # a run without validation (fold=all, or before its first one) and without curves: said on the page
    for name in ("validation", "progress.png", "report_files"):
        target = run / name
        if target.is_dir():
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        else:
            target.unlink()
    said.clear()
    path = write_run_report(run, say=said.append)
    assert path is not None
    text = path.read_text()
    assert "holds no full-case validation" in text and "No curves yet" in text and "Worst cases" not in text
    assert "without progress.png, validation/summary.json" in said[0]
    check_images_and_offline(Page(text), run)
    assert write_run_report(tmp_path / "no_run_here") is None


def test_run_report_of_a_region_plan(tmp_path: Path) -> None:
    """A region plan: the validation scores regions (named after them), the saved prediction holds each
    region's probability, drawn as the label values the regions write (named after the plan's labels)."""
    from types import SimpleNamespace

    run, cache = make_run(tmp_path, cached=("case_c",))
    regions = {"names": ["whole", "core"], "regions": [[1, 2], [2]], "class_order": [1, 2]}
    plan = SimpleNamespace(
        labels={0: "background", 1: "liver", 2: "tumour"}, ignore_label=None, settings={"regions": regions}
    )
    label = _label()
    for npy in (run / "validation").glob("*.npy"):
        np.save(npy, np.stack([label > 0, label == 2]).astype(np.float16))
    path = write_run_report(run, plan=plan, cache=cache)
    assert path is not None
    text = path.read_text()
    assert "whole Dice" in text and "core Dice" in text and "liver Dice" not in text
    assert "prediction, through the centre of liver" in text and "reference, through the centre of tumour" in text
    pred = sorted((run / "report_files").glob("0.case_c.*.pred.png"))
    ref = sorted((run / "report_files").glob("0.case_c.*.ref.png"))
    assert len(pred) == len(ref) == 2
    assert [p.read_bytes() for p in pred] == [p.read_bytes() for p in ref]  # the prediction is the reference here


# ---------------------------------------------------------------------------- evaluate
GEO = Geometry(shape=(4, 6, 8), spacing=(2.0, 1.0, 0.5))  # 1 mm³ voxels


def make_evaluation(root: Path) -> tuple[Path, Path, Path]:
    """case_a: class 1 a 2×3×4 box predicted without its first column (Dice 36/42, HD95 0.5 mm),
    class 2 exact; case_b: class 1 exact, class 2 in neither."""
    pred_dir, ref_dir, images = root / "pred", root / "ref", root / "images"
    ref = np.zeros(GEO.shape, dtype=np.uint8)
    ref[1:3, 1:4, 1:5] = 1
    ref[0:1, 4:6, 6:8] = 2
    pred = ref.copy()
    pred[1:3, 1:4, 1] = 0
    b = np.zeros(GEO.shape, dtype=np.uint8)
    b[1:3, 1:4, 1:5] = 1
    rng = np.random.default_rng(0)
    for case, (r, p) in (("case_a", (ref, pred)), ("case_b", (b, b))):
        write_image(ref_dir / f"{case}.nii.gz", r, GEO)
        write_image(pred_dir / f"{case}.nii.gz", p, GEO)
        write_image(images / f"{case}_0000.nii.gz", rng.normal(100, 10, GEO.shape).astype(np.float32), GEO)
    return pred_dir, ref_dir, images


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("evaluation")
    pred_dir, ref_dir, images = make_evaluation(root)
    out = root / "out"
    summary = evaluate_folders(pred_dir, ref_dir, labels={0: "background", **CLASSES}, out_dir=out, qc_image_dir=images)
    return summary, out


def test_evaluation_report(evaluation: tuple[dict[str, Any], Path]) -> None:
    summary, out = evaluation
    assert summary["report"] == str(out / "report.html")
    assert json.loads((out / "summary.json").read_text())["report"] == summary["report"]
    text = (out / "report.html").read_text()
    page = Page(text)
    cases = {r[0]: r[1:] for r in page.rows("cases")}
    assert list(cases) == ["case_a", "case_b"]
    # per class Dice, HD95, NSD; then the case's mean Dice and the QC link
    a, b = cases["case_a"], cases["case_b"]
    assert close(a[0], 36 / 42) and close(a[1], 0.5) and close(a[2], 1.0)
    assert close(a[3], 1.0) and close(a[4], 0.0) and close(a[5], 1.0)
    assert close(a[6], (36 / 42 + 1) / 2) and a[7] == "1"
    assert close(b[0], 1.0) and b[3:6] == ["", "", ""] and close(b[6], 1.0)
    means = {r[0]: r[1:] for r in page.rows("means")}
    assert list(means) == ["1", "2"] and close(means["1"][0], (36 / 42 + 1) / 2) and close(means["2"][0], 1.0)
    assert "1 liver Dice" in text and "2 tumour HD95 (mm)" in text
    files = check_images_and_offline(page, out)
    assert sorted(p.relative_to(out).as_posix() for p in files) == [
        "dice_boxplot.png",
        "qc/case_a.png",
        "qc/case_b.png",
    ]
    assert sum(1 for img in page.images if img.get("loading") == "lazy") == 2
    assert {"qc-case_a", "qc-case_b"} <= page.ids and ("a", "qc/case_b.png") in page.urls


def test_evaluate_command_names_the_report(tmp_path: Path) -> None:
    from segpipe.cli.commands import cmd_evaluate

    pred_dir, ref_dir, _images = make_evaluation(tmp_path)
    _code, res, text = cmd_evaluate(argparse.Namespace(output=str(tmp_path / "out")), [str(pred_dir), str(ref_dir)], {})
    assert f"report: {tmp_path / 'out' / 'report.html'}" in text.splitlines()
    assert "QC overlays" not in (tmp_path / "out" / "report.html").read_text()  # no images= given: none drawn


# ---------------------------------------------------------------------------- find-best
def test_find_best_report(tmp_path: Path) -> None:
    dws = Workspace(tmp_path).dataset("ds")
    run = dws.run_folder("3d_fullres", 1)
    run.root.mkdir(parents=True)
    run.report.write_text("<html></html>")
    decision = {
        "configurations": ["3d_fullres", "2d"],
        "mean_fg_dice": 0.83,
        "mean_fg_dice_postprocessed": 0.84,
        "class_dice_postprocessed": {"liver": 0.95, "tumour": 0.73},
        "postprocessing": {"largest_component": [1]},
        "postprocessing_scores": {"liver": {"before": 0.93, "after": 0.95}, "tumour": {"before": 0.73, "after": 0.70}},
        "cases": 10,
        "cases_total": 12,
        "candidates": [
            {"configurations": ["2d"], "mean_fg_dice": 0.78, "class_dice": {"liver": 0.9, "tumour": 0.66}},
            {"configurations": ["3d_fullres"], "mean_fg_dice": 0.81, "class_dice": {"liver": 0.92, "tumour": 0.7}},
            {
                "configurations": ["3d_fullres", "2d"],
                "mean_fg_dice": 0.83,
                "class_dice": {"liver": 0.93, "tumour": 0.73},
            },
        ],
    }
    path = write_find_best_report(dws, decision, labels=CLASSES)
    assert path == dws.best_configuration_report_path and path.parent == dws.root
    text = path.read_text()
    page = Page(text)
    rows = page.rows("candidates")
    assert [r[0] for r in rows] == ["2d", "3d_fullres", "3d_fullres + 2d"]
    assert [float(r[2]) for r in rows] == [0.78, 0.81, 0.83] and [float(r[4]) for r in rows] == [0.66, 0.7, 0.73]
    assert "<b>3d_fullres + 2d</b> (chosen)" in text
    post = {r[0]: r[1:] for r in page.rows("postprocessing")}
    assert post == {"liver": ["0.93", "0.95", "adopted"], "tumour": ["0.73", "0.7", "not adopted"]}
    assert "largest connected component of: <b>liver</b>" in text
    assert ("a", "runs/3d_fullres/fold_1/report.html") in page.urls
    check_images_and_offline(page, dws.root)


# ---------------------------------------------------------------------------- in a browser
def test_evaluation_report_in_a_browser(evaluation: tuple[dict[str, Any], Path]) -> None:
    from browser import Browser, chromium_or_skip

    _summary, out = evaluation
    with Browser(chromium_or_skip()) as browser:
        load = browser.open(out / "report.html")
        images = browser.images()
        assert load.console_errors == [] and load.external_requests == [] and load.failed_requests == []
        assert len(images) == 3 and all(img["natural_width"] > 0 for img in images), images
        # a click on a header sorts the table: case_a's mean Dice is the lower one
        browser.click("#cases th:nth-child(8)")
        order = browser.evaluate(
            "Array.from(document.querySelectorAll('#cases tbody tr td:first-child')).map(c => c.textContent)"
        )
        assert order == ["case_a", "case_b"]
        browser.click("#cases th:nth-child(8)")
        assert browser.evaluate("document.querySelector('#cases tbody tr td').textContent") == "case_b"
        assert load.console_errors == []
