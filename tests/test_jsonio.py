"""Canonical JSON (segpipe/io/jsonio.py): same data → same bytes, NaN refused, clear read errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.errors import ReadError, StateError
from segpipe.io.jsonio import dumps, read_json, write_json


def test_dumps_is_canonical():
    a = {"b": [1, 2.5, {"y": None, "x": True}], "a": "é"}
    b = {"a": "é", "b": [1, 2.5, {"x": True, "y": None}]}
    text = dumps(a)
    assert text == dumps(b) == json.dumps(a, sort_keys=True, indent=1) + "\n"
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == a


def test_numpy_values_and_paths_become_plain_json():
    data = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "a": np.arange(3),
        "p": Path("/x/y"),
        "s": {"z", "a"},
    }
    assert json.loads(dumps(data)) == {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2], "p": "/x/y", "s": ["a", "z"]}
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        dumps({"o": object()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
def test_non_finite_numbers_are_refused_with_their_place(bad):
    with pytest.raises(ValueError, match=r"non-finite number .*\['cases'\]\[1\]\['mean'\]"):
        dumps({"cases": [{"mean": 1.0}, {"mean": bad}]})
    with pytest.raises(ValueError, match=r"at \['a'\]\[2\]"):
        dumps({"a": np.array([0.0, 1.0, bad])})


def test_write_json_round_trip_and_refusal_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    data = {"z": 1, "a": [1.5, "two"], "nested": {"k": None}}
    assert write_json(path, data) == path
    assert read_json(path, what="thing", hint="make one") == data
    assert path.read_text() == dumps(data)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="non-finite"):
        write_json(path, {"z": float("nan")})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no temporary left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no plan \\(file not found\\)"),
        (b"", "empty plan file"),
        (b"  \n", "empty plan file"),
        (b'{"a": 1', "corrupt plan \\(invalid JSON at line 1"),
        (b'{"a": NaN}', "corrupt plan \\(holds NaN"),
        (b"[1, 2]", "corrupt plan \\(a JSON list, expected a dict\\)"),
        (b"\xff\xfe{}", "unreadable plan \\(not UTF-8"),
    ],
)
def test_read_json_errors_name_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "plans.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StateError, match=message) as exc:
        read_json(path, what="plan", hint="run `segpipe plan DATASET` first")
    assert str(exc.value).startswith(str(path)) and exc.value.hint == "run `segpipe plan DATASET` first"
    assert exc.value.exit_code == 4


def test_read_json_options(tmp_path):
    with pytest.raises(StateError, match="is a folder"):
        read_json(tmp_path, what="plan", hint="h")
    path = tmp_path / "desc.json"
    path.write_text("[1, 2]")
    assert read_json(path, what="list", hint="h", expect=None) == [1, 2]
    assert read_json(path, what="list", hint="h", expect=list) == [1, 2]
    path.write_text("{")
    with pytest.raises(ReadError, match="corrupt dataset description") as exc:
        read_json(path, what="dataset description", hint="fix it", error=ReadError)
    assert exc.value.exit_code == 3


def test_old_names_are_aliases(tmp_path):
    from segpipe import fingerprint
    from segpipe.planning import make_plan, plans_json

    data = {"b": 1, "a": [0.5]}
    assert fingerprint.dumps(data) == dumps(data)
    fingerprint.write_json_atomic(tmp_path / "f.json", data)
    assert (tmp_path / "f.json").read_text() == dumps(data)
    fp = {
        "dataset": "d",
        "channel_names": {"0": "MRI"},
        "labels": {"0": "background", "1": "a"},
        "cases": [{"spacing": [1.0, 1.0, 1.0], "shape_after_crop": [40, 40, 40]}] * 3,
    }
    plan = make_plan(fp)
    assert plans_json(plan) == dumps(plan.to_dict())
