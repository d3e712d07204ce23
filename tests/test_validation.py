"""Full-case validation on the preprocessing cache: Dice per case and class, summary.json, float16 softmax."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import segpipe.training.validation as validation
from segpipe.errors import ConfigError, DataError, StateError
from segpipe.training.validation import (
    format_validation,
    load_probabilities,
    plan_classes,
    probabilities_path,
    softmax_float16,
    validate_cases,
)

CONFIG = "3d_fullres"


# ---------------------------------------------------------------------------- pure pieces
def test_softmax_float16_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, -2.0], [math.log(3.0), 1.0, 0.0]], dtype=torch.float32)  # [K=2, 3 voxels]
    probs = softmax_float16(logits.clone())
    assert probs.dtype == np.float16 and probs.shape == (2, 3)
    expected = np.array([[0.25, 0.5, math.exp(-2) / (math.exp(-2) + 1)], [0.75, 0.5, 1 / (math.exp(-2) + 1)]])
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)
    # large logits do not overflow (the maximum is subtracted first)
    big = softmax_float16(torch.tensor([[1000.0], [0.0]]))
    np.testing.assert_array_equal(big.astype(np.float32), [[1.0], [0.0]])


def test_plan_classes_foreground_only_and_the_ignore_label() -> None:
    class P:
        labels = {"0": "background", "1": "a", "2": "b", "3": "Ignore"}

    classes, ignore = plan_classes(P(), ignore_index=None)  # type: ignore[arg-type]
    assert classes == {1: "a", 2: "b"} and ignore == 3
    classes, ignore = plan_classes(P(), ignore_index=2)  # type: ignore[arg-type]
    assert classes == {1: "a", 3: "Ignore"} and ignore == 2

    class Q:
        labels = {"0": "background"}

    with pytest.raises(StateError, match="no foreground class"):
        plan_classes(Q())  # type: ignore[arg-type]


def test_format_validation_names_each_class() -> None:
    result = {
        "mean_fg_dice": 0.8,
        "class_dice": {1: 0.75, 2: float("nan")},
        "class_names": {1: "anterior", 2: "posterior"},
        "num_cases": 42,
    }
    assert format_validation(result) == "mean foreground Dice 0.8000 (anterior 0.7500, posterior nan), 42 cases"


# ---------------------------------------------------------------------------- a planned, preprocessed dataset
@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 tiny demo cases (labels background, organ, vessel, lesion), planned and preprocessed for 3d_fullres."""
    import segpipe
    from segpipe.demo_data import generate_demo_dataset
    from segpipe.planning import load_plan
    from segpipe.preprocessing import Cache

    tmp = tmp_path_factory.mktemp("validation")
    root = generate_demo_dataset(tmp / "D", num_cases=3, num_test=0, fov_mm=(24.0, 32.0, 32.0))
    work = tmp / "work"
    planned = segpipe.plan(root, work_dir=work, configurations=[CONFIG], num_workers=1)
    done = segpipe.preprocess(root, work_dir=work, num_workers=1)
    plan = load_plan(planned["plans_path"])
    cache = Cache(done["configurations"][CONFIG]["cache_dir"])
    return {"plan": plan, "cache": cache, "cases": cache.cases(), "tmp": tmp}


def _labels(cache: Any, cases: list[str]) -> dict[str, np.ndarray]:
    return {cid: np.array(cache.load(cid, mmap=False)[1]) for cid in cases}


def _oracle(monkeypatch: pytest.MonkeyPatch, cache: Any, cases: list[str], num_classes: int, remap=None) -> list:
    """Replace the sliding window by one-hot logits (×10) of each case's cached label (optionally remapped);
    cases come in the order given, and the image passed must be that case's cached image."""
    order = list(cases)
    calls: list[str] = []

    def fake(network: Any, image: Any, plan_config: Any, **kwargs: Any) -> torch.Tensor:
        cid = order[len(calls)]
        calls.append(cid)
        cached_image, label, _ = cache.load(cid, mmap=False)
        np.testing.assert_array_equal(np.asarray(image), cached_image)
        assert kwargs["num_classes"] == num_classes
        target = torch.from_numpy(np.array(label)).long()
        if remap is not None:
            target = remap(target)
        return 10.0 * torch.nn.functional.one_hot(target, num_classes).permute(3, 0, 1, 2).float()

    monkeypatch.setattr(validation, "predict_case_logits", fake)
    return calls


@pytest.mark.slow
def test_oracle_network_gives_dice_one_and_writes_every_file(prepared, monkeypatch, tmp_path: Path) -> None:
    plan, cache, cases = prepared["plan"], prepared["cache"], prepared["cases"]
    assert len(cases) == 3
    calls = _oracle(monkeypatch, cache, cases, plan.num_classes)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "fold_0" / "validation"
    result = validate_cases(None, cache, cases, plan, CONFIG, out_dir=out, progress=lambda d, t: seen.append((d, t)))
    assert calls == cases and seen == [(1, 3), (2, 3), (3, 3)]

    labels = _labels(cache, cases)
    assert result["class_names"] == {1: "organ", 2: "vessel", 3: "lesion"}
    for cid, label in labels.items():
        for c in (1, 2, 3):
            d = result["case_dice"][cid][c]
            assert d == 1.0 if (label == c).any() else math.isnan(d), (cid, c, d)
    present = {c for label in labels.values() for c in (1, 2, 3) if (label == c).any()}
    assert {c for c, v in result["class_dice"].items() if v == 1.0} == present
    assert result["mean_fg_dice"] == 1.0 and result["num_cases"] == 3

    summary = json.loads((out / "summary.json").read_text())
    assert summary["foreground_mean"]["Dice"] == 1.0
    assert [e["case"] for e in summary["metric_per_case"]] == cases
    assert set(summary["mean"]) == {"1", "2", "3"}
    with open(out / "dice_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases
    assert list(rows[0]) == ["case", "dice_1_organ", "dice_2_vessel", "dice_3_lesion", "foreground_mean"]
    assert all(r["foreground_mean"] == "1.000000" for r in rows)

    assert set(result["probabilities"]) == set(cases)
    p_hot = math.exp(10) / (math.exp(10) + plan.num_classes - 1)
    for cid, label in labels.items():
        path = probabilities_path(out, cid)
        assert result["probabilities"][cid] == str(path) and path.is_file()
        probs = load_probabilities(out, cid)
        assert probs.dtype == np.float16 and probs.shape == (plan.num_classes, *label.shape)
        np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=2e-3)
        np.testing.assert_array_equal(probs.argmax(axis=0), label)
        np.testing.assert_allclose(np.take_along_axis(probs, label[None].astype(np.int64), 0), p_hot, rtol=1e-3)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # nothing half-written left


@pytest.mark.slow
def test_wrong_voxels_by_hand_and_the_ignore_label(prepared, monkeypatch, tmp_path: Path) -> None:
    """The oracle predicts organ (1) where the truth is lesion (3): Dice from counts by hand; then lesion ignored."""
    plan, cache, cases = prepared["plan"], prepared["cache"], prepared["cases"]
    labels = _labels(cache, cases)
    assert any((lab == 3).any() for lab in labels.values())

    def lesion_as_organ(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t == 3, torch.ones_like(t), t)

    _oracle(monkeypatch, cache, cases, plan.num_classes, remap=lesion_as_organ)
    result = validate_cases(None, cache, cases, plan, CONFIG, out_dir=tmp_path / "a", save_probabilities=False)
    assert result["probabilities"] == {} and not list((tmp_path / "a").glob("*.npy"))
    for cid, lab in labels.items():
        n1, n3 = int((lab == 1).sum()), int((lab == 3).sum())
        d = result["case_dice"][cid]
        assert d[1] == pytest.approx(2 * n1 / (2 * n1 + n3))
        assert d[3] == 0.0 if n3 else math.isnan(d[3])

    _oracle(monkeypatch, cache, cases, plan.num_classes, remap=lesion_as_organ)
    ignored = validate_cases(
        None, cache, cases, plan, CONFIG, out_dir=tmp_path / "b", ignore_index=3, save_probabilities=False
    )
    assert set(ignored["class_dice"]) == {1, 2} and ignored["class_dice"][1] == 1.0
    assert ignored["mean_fg_dice"] == 1.0


@pytest.mark.slow
def test_random_network_end_to_end(prepared, tmp_path: Path) -> None:
    from segpipe.networks import build_network

    torch.manual_seed(0)
    plan, cache, cases = prepared["plan"], prepared["cache"], prepared["cases"]
    network = build_network(plan.config(CONFIG), plan.in_channels, plan.num_classes)
    network.train()
    out = tmp_path / "validation"
    result = validate_cases(network, cache, cases, plan, CONFIG, out_dir=out, device="cpu")
    assert network.training  # the sliding window restores the mode
    labels = _labels(cache, cases)
    for cid, dice in result["case_dice"].items():
        for c, d in dice.items():
            assert math.isnan(d) or 0.0 <= d <= 1.0
            if math.isnan(d):  # NaN only where the reference lacks the class (and the prediction too)
                assert not (labels[cid] == c).any()
        probs = load_probabilities(out, cid, mmap=False)
        assert probs.dtype == np.float16 and probs.shape == (plan.num_classes, *labels[cid].shape)
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=2e-3)
    fg = result["mean_fg_dice"]
    assert math.isnan(fg) or 0.0 <= fg <= 1.0
    summary = json.loads(Path(result["summary_path"]).read_text())
    assert (summary["foreground_mean"]["Dice"] is None) == math.isnan(fg)
    if not math.isnan(fg):
        assert summary["foreground_mean"]["Dice"] == pytest.approx(fg)


@pytest.mark.slow
def test_refusals(prepared, tmp_path: Path) -> None:
    from segpipe.preprocessing import Cache

    plan, cache, cases = prepared["plan"], prepared["cache"], prepared["cases"]
    with pytest.raises(ConfigError, match="no validation cases"):
        validate_cases(None, cache, [], plan, CONFIG, out_dir=tmp_path / "v")
    with pytest.raises(ConfigError, match="twice"):
        validate_cases(None, cache, [cases[0], cases[0]], plan, CONFIG, out_dir=tmp_path / "v")
    with pytest.raises(ConfigError, match="not in the plan"):
        validate_cases(None, cache, cases, plan, "2d", out_dir=tmp_path / "v")
    with pytest.raises(StateError, match="not in the cache"):
        validate_cases(None, cache, ["nope"], plan, CONFIG, out_dir=tmp_path / "v")
    image, _, props = cache.load(cases[0], mmap=False)
    unlabelled = Cache(tmp_path / "cache")
    unlabelled.write("u", np.array(image), None, {k: v for k, v in props.items() if k != "arrays"})
    with pytest.raises(DataError, match="without a label"):
        validate_cases(None, unlabelled, ["u"], plan, CONFIG, out_dir=tmp_path / "v")
    assert not (tmp_path / "v" / "summary.json").exists()
