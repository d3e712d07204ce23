"""Reliability: hostile or mistaken settings, paths no file system takes, and running out of memory.

Each test is one case; its docstring's first line says the behaviour. A user's setting, path or
the machine's memory may end a command, but always with its own exit code (2 for a setting, 4 for
memory) and a line that names what to change, never as an internal error (70).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import segpipe
from segpipe import cli
from segpipe.cli.parser import build_parser, flag_overrides
from segpipe.config import COMMAND_SETTINGS, DEMO_SCHEDULE, expand_key, settings_config
from segpipe.demo_data import generate_demo_dataset
from segpipe.settings import selectable_groups

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 5-case demo dataset planned coarsely (3d_fullres only)."""
    root = tmp_path_factory.mktemp("limits")
    data = generate_demo_dataset(root / "Lim", num_cases=5, num_test=1)
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
    return data, work


def _error(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)["error"]


def test_settings_no_file_system_or_trainer_can_use_are_refused_naming_the_setting(
    planned: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dataset_name=` or `work_dir=` of 5000 characters, `seed=-1`, `lr=nan`, `lr=inf`: exit 2 naming the setting, before any work; a NUL byte in a path given to the Python API is a `SegpipeError`."""
    data, work = planned
    long = "x" * 5000
    attempts = [
        (["plan", str(data), f"dataset_name={long}", f"work_dir={tmp_path / 'w'}"], "dataset_name"),
        (["plan", str(data), f"work_dir={tmp_path / long}"], "work_dir"),
        (["preprocess", f"work_dir={long}"], "work_dir"),
        (["train", f"work_dir={work}", "seed=-1", "epochs=1"], "seed"),
        (["train", f"work_dir={work}", "lr=nan", "epochs=1"], "lr"),
        (["train", f"work_dir={work}", "lr=inf", "epochs=1"], "lr"),
    ]
    for argv, setting in attempts:
        code = cli.main([*argv, "--json"])
        error = _error(capsys)
        assert code == 2, (argv[:2], error)
        assert setting in error["message"] and "internal error" not in error["message"], error
    assert not (tmp_path / "w").exists()
    assert not (work / "Lim" / "runs").exists()
    for call in (
        lambda: segpipe.check(f"{data}\0x"),
        lambda: segpipe.plan(data, work_dir=f"{tmp_path}/a\0b"),
        lambda: segpipe.infer(f"{data}\0", output=tmp_path / "o"),
    ):
        with pytest.raises(segpipe.SegpipeError, match="NUL byte"):
            call()


def test_a_setting_is_named_as_the_user_typed_it_and_a_folder_that_takes_no_files_is_said_not_writable(
    planned: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer x name=../../x` is refused as the unknown setting `name` (not a trainer's); `work_dir=/proc` is refused as not writable, without a misleading "no such file"."""
    code = cli.main(["infer", str(tmp_path), "name=../../x", "--json"])
    error = _error(capsys)
    assert code == 2 and "'name'" in error["message"] and "trainer" not in error["message"], error
    code = cli.main(["plan", str(planned[0]), "work_dir=/proc", "--json"])
    error = _error(capsys)
    assert code == 4 and "not writable" in error["message"] and "No such file" not in error["message"], error


def test_out_of_memory_is_exit_4_with_what_was_asked_for_and_a_fix(
    planned: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An allocation that fails (numpy's "Unable to allocate 748 MiB") in `plan`, `preprocess` or `train` is exit 4 with the size asked for, the memory free and a fix (fewer workers, a smaller batch), never exit 3 or 70."""
    import segpipe.api as api
    import segpipe.fingerprint as fingerprint

    data, work = planned

    def no_memory(*args, **kwargs):
        raise MemoryError(
            "Unable to allocate 748. MiB for an array with shape (1, 700, 700, 400) and data type float32"
        )

    monkeypatch.setattr(fingerprint, "fingerprint_dataset", no_memory)  # plan's first big step
    monkeypatch.setattr(api.data, "planned_dataset", no_memory)  # preprocess's
    monkeypatch.setattr(api.training, "planned_dataset", no_memory)  # train's
    runs = [
        (["plan", str(data), f"work_dir={work.parent / 'other'}", "force=true"], "num_workers"),
        (["preprocess", f"work_dir={work}"], "num_workers"),
        (["train", f"work_dir={work}", "epochs=1"], "batch_size"),
    ]
    for argv, fix in runs:
        code = cli.main([*argv, "--json"])
        error = _error(capsys)
        assert code == 4, (argv[0], error)
        assert "out of memory" in error["message"] and "748" in error["message"] and "GiB" in error["message"]
        assert fix in error["fix"], error


#: ``key=value`` words in fix hints that are Python arguments, not settings (``Geometry(shape=...)``,
#: ``write_dicom_series(rescale=True)``) or the generic ``key=value`` itself
PYTHON_WORDS = {"shape", "spacing", "geometry", "rescale", "key"}


def _hint_words() -> dict[str, set[str]]:
    """Every ``key=`` word in a ``hint=``/``fix=`` text of segpipe's sources → where it is."""
    token = re.compile(r"(?<![\w.\-/])([a-z_][a-z0-9_.]*)=(?!=)")
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "segpipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg in ("hint", "fix"):
                for const in ast.walk(node.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        for m in token.finditer(const.value):
                            found.setdefault(m.group(1), set()).add(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_fix_hint_names_settings_the_command_line_takes(capsys: pytest.CaptureFixture[str]) -> None:
    """Every `key=value` a fix hint suggests is a setting or option the command line takes (`overwrite=true` included, the same as `--overwrite`)."""
    words = _hint_words()
    assert "overwrite" in words  # the hints do suggest it
    groups = selectable_groups()
    options = {f"{g}.{leaf}" for g, names in groups.items() for n in names for leaf in _option_keys(g, n)}
    unknown = {}
    for key, where in words.items():
        if key in PYTHON_WORDS or key in groups or key == "overwrite":
            continue
        if not any(_takes(command, key) for command in COMMAND_SETTINGS) and not any(
            o.endswith("." + key) for o in options
        ):
            unknown[key] = sorted(where)
    assert not unknown, unknown
    # `overwrite=true` works wherever --overwrite does
    for command in ("train", "infer", "export"):
        ns = build_parser().parse_args([command])
        ns.overwrite = False
        assert flag_overrides(ns, command, ["overwrite=true", "fold=0"]) == ["fold=0"] and ns.overwrite
    ns = build_parser().parse_args(["train"])
    with pytest.raises(segpipe.SegpipeError):
        flag_overrides(ns, "train", ["overwrite=maybe"])


def _takes(command: str, key: str) -> bool:
    try:
        expand_key(key, _command_keys(command))
    except segpipe.SegpipeError:
        return False
    return True


def _option_keys(group: str, option: str) -> list[str]:
    import yaml

    path = REPO / "conf" / group / f"{option}.yaml"
    return list((yaml.safe_load(path.read_text()) or {}).keys())


def _help_rows(command: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    block = text.split("settings (key=value, shown with their defaults):", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.strip().splitlines():
        key, _, rest = line.strip().partition("=")
        rows[key] = rest.split("  ", 1)[0].strip()
    return rows


def test_each_commands_help_shows_the_defaults_it_uses(capsys: pytest.CaptureFixture[str]) -> None:
    """Every default a command's `--help` shows is the one that command runs with (the demo's 12 × 25 schedule, which configuration `train` picks), and `segpipe config` says what each of two same-named settings means."""
    from omegaconf import OmegaConf

    for command in COMMAND_SETTINGS:
        if command == "config":
            continue
        rows = _help_rows(command, capsys)
        cfg = settings_config(command, {})
        for key, shown in rows.items():
            if key in selectable_groups() or command == "demo" and key in ("epochs", "iterations_per_epoch"):
                continue
            full = expand_key(key, [k for k in _command_keys(command)])
            value = OmegaConf.select(cfg, full)
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            if shown.startswith("$"):
                continue  # an environment variable's fallback
            assert shown == text, (command, key, shown, text)
    demo = _help_rows("demo", capsys)
    assert (int(demo["epochs"]), int(demo["iterations_per_epoch"])) == (
        DEMO_SCHEDULE["epochs"],
        DEMO_SCHEDULE["iterations_per_epoch"],
    )
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    train_help = capsys.readouterr().out
    config_line = next(line for line in train_help.splitlines() if line.strip().startswith("config="))
    assert "3d_fullres" in config_line and "every planned one" not in config_line, config_line
    # `segpipe config`: each of two settings sharing a name says which it is
    assert cli.main(["config"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\s+(batch_size|device):", line)]
    assert len(lines) == 4 and all("#" in line for line in lines), lines
    comments = [line.split("#", 1)[1] for line in lines]
    assert len(set(comments)) == 4, comments


def _command_keys(command: str) -> list[str]:
    from segpipe.config import command_settings

    return command_settings(command)


def test_a_cpu_budget_chooses_a_small_batch_and_a_per_step_schedule_unless_told_otherwise(
    planned: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train max_time=…` on a CPU trains with batch 2 and the learning rate decayed per iteration (said in the run's first line, recorded in settings.json); an explicit `batch_size=` or `schedule_interval=` wins, and without a budget the plan's batch stays."""
    import shutil

    from segpipe.planning import load_plan
    from segpipe.training.optim import budget_defaults

    data, _work = planned
    mine = tmp_path / "work"
    segpipe.plan(
        data,
        work_dir=mine,
        configurations=["3d_fullres"],
        target_spacing=[6.0, 3.0, 3.0],
        base_features=4,
        max_features_3d=16,
        max_dataset_fraction=1.0,  # a batch above 2 on five cases
        num_workers=1,
    )
    plan_batch = load_plan(next(mine.glob("*/plans.json"))).config("3d_fullres").batch_size
    assert plan_batch > 2
    # the rule itself
    assert budget_defaults(max_time="20m", device="cpu", given=[], plan_batch=7)[0] == {
        "batch_size": 2,
        "schedule_interval": "step",
    }
    assert budget_defaults(max_time="20m", device="cpu", given=["train.batch_size"], plan_batch=7)[0] == {
        "schedule_interval": "step"
    }
    assert (
        budget_defaults(max_time="20m", device="cpu", given=["batch_size", "schedule_interval"], plan_batch=7)[0] == {}
    )
    assert budget_defaults(max_time=None, device="cpu", given=[], plan_batch=7)[0] == {}
    # a real run under a budget
    lines: list[str] = []
    segpipe.train(
        work_dir=mine,
        fold=0,
        epochs=1,
        iterations_per_epoch=2,
        val_batches=1,
        num_workers=0,
        max_time="10m",
        device="cpu",
        log=lines.append,
    )
    assert any("budget on the CPU: batch 2" in line and "per iteration" in line for line in lines), lines
    saved = json.loads(next(mine.glob("*/runs/3d_fullres/fold_0/settings.json")).read_text())["settings"]
    assert saved["batch_size"] == 2 and saved["optim"]["schedule_interval"] == "step"
    # an explicit batch size is kept
    shutil.rmtree(next(mine.glob("*/runs")))
    lines.clear()
    segpipe.train(
        work_dir=mine,
        fold=0,
        epochs=1,
        iterations_per_epoch=2,
        val_batches=1,
        num_workers=0,
        max_time="10m",
        device="cpu",
        batch_size=3,
        log=lines.append,
    )
    saved = json.loads(next(mine.glob("*/runs/3d_fullres/fold_0/settings.json")).read_text())["settings"]
    assert saved["batch_size"] == 3 and saved["optim"]["schedule_interval"] == "step"


def test_a_case_that_runs_out_of_memory_in_infer_ends_the_batch_with_exit_4_and_the_others_written(
    tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a batch `infer`, a case whose prediction runs out of memory is listed with the allocation and a fix (`batch_size=1`), the other cases are written, and the batch exits 4 (memory), not 3 (bad data)."""
    import shutil

    from segpipe.inference.predictor import Predictor

    model, good = tiny_model
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(good, cases / "big.nii.gz")
    shutil.copy(good, cases / "small.nii.gz")
    real = Predictor.predict

    def predict(self, source, *args, **kwargs):
        if kwargs.get("case_id") == "big":
            raise MemoryError(
                "Unable to allocate 748. MiB for an array with shape (1, 700, 700, 400) and data type float32"
            )
        return real(self, source, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", predict)
    code = cli.main(["infer", str(cases), "-o", str(tmp_path / "out"), "-m", str(model), "tta=false", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 4, result
    assert result["written"] == ["small"] and [f["case"] for f in result["failed"]] == ["big"]
    assert "748" in result["failed"][0]["error"] and "batch_size=1" in result["failed"][0]["hint"]
    assert not (tmp_path / "out" / "big.nii.gz").exists()


def test_settings_a_run_cannot_use_are_refused_before_it_starts(
    planned: tuple[Path, Path], tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train momentum=2`, `precision=abc` or `loss=tversky alpha=-1`, `infer checkpoint=worst` with a model folder, `export -o` under a folder that takes no files: each a one-line error naming what to change (exit 2, or 4 for the place), never a run that diverges or an internal error."""
    data, work = planned
    model, good = tiny_model
    attempts = [
        (["train", f"work_dir={work}", "epochs=1", "momentum=2"], 2, "momentum"),
        (["train", f"work_dir={work}", "epochs=1", "precision=abc"], 2, "precision"),
        (["train", f"work_dir={work}", "epochs=1", "loss=tversky", "alpha=-1"], 2, "alpha"),
        (["infer", str(good), "-o", str(tmp_path / "o"), "-m", str(model), "checkpoint=worst"], 2, "checkpoint"),
    ]
    for argv, expected, words in attempts:
        code = cli.main([*argv, "--json"])
        error = _error(capsys)
        assert code == expected and words in error["message"] and "internal error" not in error["message"], error
    assert not [p.name for p in (work / "Lim" / "runs").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not (tmp_path / "o").exists()
    from segpipe.inference.model import export_model, load_model_folder

    with pytest.raises(segpipe.SegpipeError, match="cannot create the model folder") as info:
        export_model(load_model_folder(model), "/proc/segpipe_model")
    assert info.value.exit_code == 4
