"""Settings: every key of every command is honoured by it or refused by it; the workspace; the API.

These run the CLI in-process (``segpipe.cli.main``) where a subprocess adds nothing, so the
whole walk over every (command, setting) pair stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, make_msd

import segpipe
from segpipe import api, cli
from segpipe.cli.text import table
from segpipe.config import COMMAND_SETTINGS, accepts, compose_config, settings_config
from segpipe.settings import all_settings

AVAILABLE = [c for c in COMMAND_SETTINGS if c != "config"]


def _value_for(key: str) -> tuple[str, Any]:
    """A command-line value different from the default, and the Python value it composes to."""
    special: dict[str, tuple[str, Any]] = {
        "work_dir": ("/tmp/segpipe-walk", "/tmp/segpipe-walk"),
        "dataset": ("Other", "Other"),
        "dataset_name": ("Renamed", "Renamed"),
        "config": ("2d", "2d"),
        "dicom.series": ("t1*", "t1*"),
        "dicom.modality": ("MR", "MR"),
        "dicom.spacing_tolerance": ("0.05", 0.05),
        "planner.configurations": ("[2d]", ["2d"]),
        "planner.target_spacing": ("[2,1,1]", [2, 1, 1]),
        "planner.normalization": ("{0:zscore}", {0: "zscore"}),
        "train.fold": ("3", "3"),
        "optim.schedule_interval": ("step", "step"),
        "train.device": ("cpu", "cpu"),
        "train.precision": ("bf16-mixed", "bf16-mixed"),
        "train.max_time": ("20m", "20m"),
        "train.batch_size": ("3", 3),
        "train.case_sampling": ("hardness", "hardness"),
        "train.checkpoint_every": ("10m", "10m"),
        "train.progress": ("false", False),
        "train.tensorboard": ("false", False),
        "infer.folds": ("[0,2]", [0, 2]),
        "infer.checkpoint": ("best", "best"),
        "infer.device": ("cpu", "cpu"),
        "infer.runtime": ("torch", "torch"),
        "infer.window": ("fit", "fit"),
        "infer.quantize": ("int8", "int8"),
        "infer.quantize_tolerance": ("0.01", 0.01),
        "infer.precision": ("bf16", "bf16"),
        "infer.format": ("nrrd", "nrrd"),
        "evaluate.images": ("/tmp/images", "/tmp/images"),
        "evaluate.ignore_label": ("5", 5),
    }
    if key in special:
        return special[key]
    default = _default(key)
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 3), default + 3
    if isinstance(default, float):
        return str(default * 0.5), default * 0.5
    if default is None:  # num_workers
        return "1", 1
    raise AssertionError(f"no test value for {key}")


def _default(key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(compose_config([]), key)


def _capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the API functions the CLI calls by recorders of what they receive."""
    seen: dict[str, Any] = {}

    class Report:
        findings: list[Any] = []
        errors: list[Any] = []
        ok = True
        cases_checked = 0
        cases_with_errors: list[str] = []

        def to_dict(self) -> dict[str, Any]:
            return {}

    def record(result: Any):
        def fn(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("log", None)
            kwargs.pop("force", None) if "force" in kwargs and kwargs["force"] is False else None
            seen.update(kwargs)
            seen["__positional__"] = args
            # the API's own validation must accept what the CLI passes on
            return result() if callable(result) else result

        return fn

    monkeypatch.setattr(api, "info", record({"path": "x"}))
    monkeypatch.setattr(api, "check", record(Report))
    monkeypatch.setattr(api, "plan", record({"configurations": [], "plan": {}, "plans_path": "p"}))
    monkeypatch.setattr(api, "preprocess", record({"configurations": {}}))
    monkeypatch.setattr(
        api,
        "train",
        record(
            {
                "dataset": "d",
                "configuration": "c",
                "fold": "0",
                "pseudo_dice": [],
                "already_finished": True,
                "finished": True,
                "epochs": 1,
                "planned_epochs": 1,
                "ema_fg_dice": 0.0,
                "run_dir": "r",
            }
        ),
    )
    monkeypatch.setattr(
        api,
        "infer",
        record({"written": [], "skipped": [], "failed": [], "seconds": 0.0, "output": "o", "format": "nii.gz"}),
    )
    monkeypatch.setattr(api, "export", record({"model": "m", "dataset": "d", "members": []}))
    monkeypatch.setattr(
        api,
        "evaluate",
        record({"mean": {}, "foreground_mean": {}, "n_cases": 0, "output": "o", "labels": {}}),
    )
    monkeypatch.setattr(
        api,
        "find_best",
        record(
            {
                "candidates": [],
                "configurations": ["c"],
                "mean_fg_dice": 0.5,
                "mean_fg_dice_postprocessed": 0.5,
                "postprocessing": {"largest_component": []},
                "cases": 1,
                "cases_total": 1,
                "path": "p",
            }
        ),
    )
    monkeypatch.setattr(
        api,
        "demo",
        record({"data": "d", "dicom_data": "d", "check": {"cases_checked": 0}, "check_dicom": {"cases_checked": 0}}),
    )
    return seen


@pytest.mark.parametrize("command", AVAILABLE)
def test_every_setting_is_honoured_or_refused(command, monkeypatch, capsys, tmp_path):
    seen = _capture(monkeypatch)
    paths = {
        "info": [str(tmp_path)],
        "check": [str(tmp_path)],
        "plan": [str(tmp_path)],
        "preprocess": [],
        "demo": [],
        "train": [],
        "infer": [str(tmp_path)],
        "export": ["-o", str(tmp_path / "model")],
        "find-best": [],
        "evaluate": [str(tmp_path), str(tmp_path)],
    }[command]
    checked = 0
    from segpipe.settings import selectable_groups

    for key in all_settings():
        if key.partition(".")[0] in selectable_groups() and key.endswith(".name"):
            checked += 1  # the option itself: selected with group=OPTION (test_group_selection)
            continue
        text, value = _value_for(key)
        seen.clear()
        code = cli.main([command, *paths, f"{key}={text}"])
        err = capsys.readouterr().err
        if accepts(command, key):
            assert code == 0, (key, err)
            passed = seen.get(key, seen.get(key.rsplit(".", 1)[-1]))
            if key == "dataset" and passed is None:  # the dataset travels as the positional argument
                passed = seen["__positional__"][0]
            assert passed == value, f"{command}: {key}={text} reached the API as {passed!r}"
            # and the API's own settings layer takes it too (same validation for Python callers)
            if command != "demo" or key == "work_dir":
                cfg = settings_config(command, {key: value})
                from omegaconf import OmegaConf

                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
                assert got == value
        else:
            assert code == 2, (command, key, err)
            assert key in err and "does not use" in err, err
        checked += 1
    assert checked == len(all_settings())


def test_bare_names_aliases_and_hints(capsys):
    cfg = compose_config(["configuration=2d", "gpu_memory_gb=24", "seed=7"])
    assert cfg.config == "2d" and cfg.planner.gpu_memory_gb == 24 and cfg.train.seed == 7
    code = cli.main(["config", "configuratoin=2d"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown setting 'configuratoin'" in err
    hint = err.split("did you mean", 1)[1].split("?")[0]
    names = [n.strip() for n in hint.split(" or ")]
    assert len(names) == len(set(names)), f"hint repeats a name: {hint}"
    assert "config" in names


@pytest.mark.parametrize(
    "bad", ["num_workers=abc", "force=maybe", "gpu_memory_gb=lots", "epochs=many", "spacing_tolerance=x"]
)
def test_bad_values_are_usage_errors(bad, capsys):
    code = cli.main(["config", bad, "--json"])
    out = capsys.readouterr()
    assert code == 2, out.err
    assert json.loads(out.out)["error"]["exit_code"] == 2
    assert "internal error" not in out.err


def test_configurations_without_brackets(tmp_path):
    root = make_msd(tmp_path / "Tiny")
    res = segpipe.plan(root, work_dir=tmp_path / "w", configurations="3d_fullres")
    assert list(res["plan"]["configurations"]) == ["3d_fullres"]
    code = cli.main(["plan", str(root), f"work_dir={tmp_path / 'w'}", "configurations=3d_fullres,2d", "--json"])
    assert code == 0


def readme_api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_api_example_runs_twice_in_one_process(tmp_path):
    """The README's example, verbatim, twice in one interpreter: `segpipe.preprocess` stays callable."""
    example = readme_api_example()
    assert "segpipe.preprocess(" in example and "segpipe.plan(" in example
    script = "for attempt in range(2):\n" + textwrap.indent(example, "    ") + "\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert (tmp_path / "example_work" / "example_data" / "plans.json").is_file()


def test_no_public_function_shares_a_name_with_a_submodule():
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(segpipe.__path__)}
    public = {n for n in segpipe.__all__ if callable(getattr(segpipe, n))}
    assert not public & submodules, public & submodules
    # names the later commands' functions will take stay free for them
    assert not {"train", "infer", "evaluate", "export", "find_best"} & submodules


def test_two_datasets_with_one_name_are_refused(tmp_path, capsys):
    a = make_msd(tmp_path / "a" / "Tiny")
    b = make_msd(tmp_path / "b" / "Tiny", n=4)
    work = tmp_path / "work"
    assert cli.main(["plan", str(a), f"work_dir={work}", "configurations=[3d_fullres]"]) == 0
    capsys.readouterr()
    plans_before = (work / "Tiny" / "plans.json").read_bytes()
    fp_before = (work / "Tiny" / "fingerprint.json").read_bytes()
    code = cli.main(["plan", str(b), f"work_dir={work}", "configurations=[3d_fullres]"])
    err = capsys.readouterr().err
    assert code == 4 and "already holds a dataset named 'Tiny'" in err and "dataset_name=" in err
    assert (work / "Tiny" / "plans.json").read_bytes() == plans_before
    assert (work / "Tiny" / "fingerprint.json").read_bytes() == fp_before
    # the fix the message names works, and both stay apart
    assert cli.main(["plan", str(b), f"work_dir={work}", "dataset_name=Tiny_b", "configurations=[3d_fullres]"]) == 0
    capsys.readouterr()
    assert (
        json.loads((work / "Tiny_b" / "fingerprint.json").read_text())["num_cases"] == 4
        or len(json.loads((work / "Tiny_b" / "fingerprint.json").read_text())["cases"]) == 4
    )
    # the same source again is fine
    assert cli.main(["plan", str(a), f"work_dir={work}", "configurations=[3d_fullres]"]) == 0
    capsys.readouterr()
    # preprocess: two planned datasets need dataset=NAME; the names are listed
    code = cli.main(["preprocess", f"work_dir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and "Tiny" in err and "Tiny_b" in err and "dataset=NAME" in err
    assert cli.main(["preprocess", f"work_dir={work}", "dataset=Tiny_b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "Tiny_b"
    assert sum(len(r["processed"]) for r in out["configurations"].values()) == 4


def test_preprocess_finds_the_only_planned_dataset(tmp_path, capsys):
    root = make_msd(tmp_path / "Tiny")
    work = tmp_path / "work"
    code = cli.main(["preprocess", f"work_dir={work}"])
    err = capsys.readouterr().err
    assert code == 4 and "no planned dataset" in err
    assert cli.main(["plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]"]) == 0
    capsys.readouterr()
    assert cli.main(["preprocess", f"work_dir={work}", "config=3d_fullres", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "Tiny" and len(out["configurations"]["3d_fullres"]["processed"]) == 3
    code = cli.main(["preprocess", f"work_dir={work}", "config=2d"])
    err = capsys.readouterr().err
    assert code == 2 and "2d" in err and "planned: 3d_fullres" in err


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_unusable_work_dir_is_refused_before_any_work(tmp_path, kind, capsys, monkeypatch):
    root = make_msd(tmp_path / "Tiny")
    work = tmp_path / "work"
    if kind == "file":
        work.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            # root ignores permission bits: simulate a read-only file system for the probe write
            import segpipe.workspace as wsmod

            real = Path.write_bytes

            def refuse(self: Path, data: bytes) -> int:
                if self.parent == work:
                    raise PermissionError(13, "Read-only file system", str(self))
                return real(self, data)

            monkeypatch.setattr(wsmod.Path, "write_bytes", refuse)
        work.mkdir()
        work.chmod(0o500)
    import segpipe.fingerprint as fpmod

    def no_fingerprint(*a: Any, **k: Any) -> Any:
        raise AssertionError("the fingerprint ran before the workspace was checked")

    monkeypatch.setattr(fpmod, "compute_fingerprint", no_fingerprint)
    code = cli.main(["plan", str(root), f"work_dir={work}", "--json"])
    out = capsys.readouterr()
    assert code == 4, out.err
    assert "work_dir" in out.err and ("not writable" in out.err or "is a file" in out.err)
    assert json.loads(out.out)["error"]["exit_code"] == 4


def test_json_error_object_on_internal_error_and_interrupt(monkeypatch, capsys, tmp_path):
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("kaput")

    monkeypatch.setattr(api, "check", boom)
    assert cli.main(["check", str(tmp_path), "--json"]) == 70
    out = capsys.readouterr()
    err = json.loads(out.out)["error"]
    assert err["exit_code"] == 70 and err["type"] == "RuntimeError" and "kaput" in err["message"]
    assert len(out.err.strip().splitlines()) <= 2

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "check", interrupted)
    assert cli.main(["check", str(tmp_path), "--json"]) == 130
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["exit_code"] == 130
    assert out.err.strip() == "segpipe check: error: interrupted"

    def disk_full(*a: Any, **k: Any) -> Any:
        raise OSError(28, "No space left on device", str(tmp_path / "x.npy"))

    monkeypatch.setattr(api, "check", disk_full)
    assert cli.main(["check", str(tmp_path), "--json"]) == 4
    out = capsys.readouterr()
    assert "no space left" in out.err and json.loads(out.out)["error"]["exit_code"] == 4


def test_help_lists_settings_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("fold=0", "epochs=", "loss=dice_ce", "max_time=null", "seed=12345", "config=null", "work_dir="):
        assert key in out, key
    assert "example:" in out and "130 interrupted" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "130" in out and "not available" not in out


def test_messages_speak_of_the_product_only():
    import re

    words = re.compile(r"\b(landed|issues?|ticket)\b", re.IGNORECASE)
    for path in (REPO / "segpipe").rglob("*.py"):
        found = words.search(path.read_text(encoding="utf-8"))
        assert found is None, f"{path.relative_to(REPO)} mentions {found.group(0)!r}"
    for path in (REPO / "conf").rglob("*.yaml"):
        assert "landed" not in path.read_text(encoding="utf-8")


def test_info_on_a_dataset_folder_says_what_it_is(tmp_path, capsys):
    root = make_msd(tmp_path / "Tiny")
    code = cli.main(["info", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "dataset folder" in err and "segpipe check" in err
    code = cli.main(["info", str(root / "imagesTr")])
    err = capsys.readouterr().err
    assert code == 2 and "without DICOM" in err and "case_000.nii.gz" in err
    code = cli.main(["info", str(root / "imagesTr" / "case_000.nii.gz"), "series=t1"])
    err = capsys.readouterr().err
    assert code == 2 and "DICOM input only" in err


def test_tables_fit_the_terminal_width():
    rows = [{"uid": "1.2.3", "description": "x" * 80, "folder": "/very/long/" + "y" * 60}]
    text = table(rows, width=60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "…" in text
    assert "y" * 60 in table(rows, width=None)  # piped output keeps every character


def test_info_exits_3_when_no_volume_is_read_and_still_lists(tmp_path, capsys):
    """Several candidate series: the listing is printed, then exit 3 with the reason."""
    import numpy as np

    from segpipe.geometry import Geometry
    from segpipe.io.dicom import write_dicom_series

    geo = Geometry(shape=(4, 8, 8), spacing=(2.0, 1.0, 1.0))
    data = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)
    write_dicom_series(tmp_path / "study" / "a", data, geo, modality="MR", series_description="T1post", series_number=1)
    write_dicom_series(tmp_path / "study" / "b", data, geo, modality="MR", series_description="T2_reg", series_number=2)
    code = cli.main(["info", str(tmp_path / "study")])
    out = capsys.readouterr()
    assert code == 3, out.err
    assert "T1post" in out.out and "T2_reg" in out.out and "no volume read" in out.out
    code = cli.main(["info", str(tmp_path / "study"), "series=t1*", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["shape"] == [4, 8, 8] and not res.get("volume_error")
    code = cli.main(["info", str(tmp_path / "study"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 3 and "volume_error" in res and len(res["series"]) == 2


def test_group_selection(capsys):
    """`optim=adamw` selects conf/optim/adamw.yaml; its keys become settings; unknown options are refused."""
    cfg = compose_config(["optim=adamw", "lr=0.002"])
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.002 and list(cfg.optim.betas) == [0.9, 0.999]
    assert compose_config([]).optim.name == "sgd"
    cfg = settings_config("train", {"optim": "adamw", "weight_decay": 0.05})
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.05
    assert cli.main(["config", "optim=adam"]) == 2
    assert "valid: adamw, sgd" in capsys.readouterr().err
    assert cli.main(["config", "optim.name=adamw"]) == 2
    assert "optim=OPTION" in capsys.readouterr().err
    assert cli.main(["config", "amsgrad=true"]) == 2  # an adamw key while sgd is selected
    assert "unknown setting 'amsgrad'" in capsys.readouterr().err
    assert cli.main(["config", "optim=adamw", "amsgrad=true", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["amsgrad"] is True
