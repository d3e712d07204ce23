"""progress.png from a training history (per-epoch dicts, the module's lists, or metrics.csv)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from segpipe.errors import DataError, StateError
from segpipe.training.plots import (
    FIG_HEIGHT,
    FIG_WIDTH,
    PROGRESS_DPI,
    history_rows,
    read_metrics_csv,
    write_progress_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = (int(FIG_WIDTH * PROGRESS_DPI), int(FIG_HEIGHT * PROGRESS_DPI))


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", head[16:24])


def epochs(n: int) -> list[dict]:
    out, ema = [], math.nan
    for e in range(n):
        dice = [0.5 + 0.4 * e / max(n, 1), 0.3 + 0.5 * e / max(n, 1)]
        mean = sum(dice) / 2
        ema = mean if math.isnan(ema) else 0.9 * ema + 0.1 * mean
        out.append(
            {
                "epoch": e,
                "train_loss": 1.0 - e / (n + 1),
                "val_loss": 1.1 - e / (n + 1),
                "pseudo_dice": dice,
                "mean_fg_dice": mean,
                "ema_fg_dice": ema,
                "lr": 0.01 * (1 - e / n) ** 0.9,
                "epoch_seconds": 10.0 + (e % 3),
            }
        )
    return out


def test_history_rows_fills_missing_fields_and_takes_the_modules_lists() -> None:
    rows = history_rows([{"epoch": 3, "train_loss": 0.5, "pseudo_dice": [0.2, float("nan"), 0.6]}, {"epoch": 4}])
    assert [r["epoch"] for r in rows] == [3, 4]
    assert math.isnan(rows[0]["val_loss"]) and math.isnan(rows[1]["train_loss"]) and math.isnan(rows[0]["lr"])
    assert rows[0]["mean_fg_dice"] == pytest.approx(0.4)  # mean of the classes present, by hand
    assert rows[1]["pseudo_dice"] == [] and math.isnan(rows[1]["mean_fg_dice"])

    columns = {
        "epoch": [0, 1],
        "train_loss": [0.9, 0.8],
        "val_loss": [1.0, 0.95],
        "pseudo_dice": [np.array([0.1, 0.2]), np.array([0.3, 0.4])],
        "mean_fg_dice": [0.15, 0.35],
        "ema_fg_dice": [0.15, 0.17],
        "lr": [0.01, 0.005],
        "epoch_seconds": [12.0, 11.0],
    }
    rows = history_rows(columns)
    assert len(rows) == 2 and rows[1]["pseudo_dice"] == [pytest.approx(0.3), pytest.approx(0.4)]
    assert rows[1]["ema_fg_dice"] == 0.17 and rows[0]["epoch_seconds"] == 12.0
    with pytest.raises(DataError, match="training history"):
        history_rows(42)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="epoch record 0"):
        history_rows([3.0])  # type: ignore[list-item]


@pytest.mark.parametrize("n", [0, 1, 50])
def test_progress_png_for_0_1_and_50_epochs(tmp_path: Path, n: int) -> None:
    path = write_progress_png(tmp_path / "run" / "progress.png", epochs(n), class_names=["organ", "vessel"], title="x")
    assert path == tmp_path / "run" / "progress.png"
    assert png_size(path) == SIZE
    assert path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["progress.png"]  # nothing half-written left


def test_progress_png_without_optional_fields(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(5)]
    assert png_size(write_progress_png(tmp_path / "a.png", history)) == SIZE
    nan = float("nan")
    history = [{"epoch": 0, "train_loss": nan, "val_loss": nan, "pseudo_dice": [nan], "lr": nan}]
    assert png_size(write_progress_png(tmp_path / "b.png", history)) == SIZE
    # the same history draws the same bytes (no timestamp in the file)
    again = write_progress_png(tmp_path / "c.png", history)
    assert again.read_bytes() == (tmp_path / "b.png").read_bytes()


def test_metrics_csv_round_trip(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,train_loss,val_loss,dice_organ,dice_2,mean_fg_dice,ema_fg_dice,lr,seconds,extra\n"
        "0,0.9,0.95,0.5,,0.5,0.5,0.01,12.5,x\n"
        "1,0.8,,0.6,0.2,0.4,0.49,0.0091,11,y\n"
    )
    rows = read_metrics_csv(csv_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["pseudo_dice"]["organ"] == 0.5 and math.isnan(rows[0]["pseudo_dice"]["2"])
    assert rows[1]["pseudo_dice"] == {"organ": 0.6, "2": 0.2}
    assert math.isnan(rows[1]["val_loss"]) and rows[1]["lr"] == 0.0091
    assert rows[0]["epoch_seconds"] == 12.5 and rows[1]["ema_fg_dice"] == 0.49
    assert "extra" not in rows[0]
    assert png_size(write_progress_png(tmp_path / "progress.png", rows)) == SIZE

    with pytest.raises(StateError, match="cannot read the training metrics"):
        read_metrics_csv(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'epoch' column"):
        read_metrics_csv(tmp_path / "bad.csv")
