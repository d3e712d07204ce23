"""Where a batch's outputs may go: never onto an input.

``segpipe infer INPUT -o OUT`` writes one label map, one report (and optionally probabilities and a
DICOM-SEG) per case into ``OUT``. :func:`check_output_apart` refuses, before anything is written,
an ``OUT`` that would overwrite or mix with what is being segmented: ``OUT`` is the input folder
itself, an input file, a case folder or inside one (a DICOM series folder above all: a DICOM-SEG
written there would become a slice of the series), inside a plain folder of images (the next run
would take it for a case), or a file of ``OUT`` would be an input file.
Paths are compared after resolving links and ``..``, so the same folder reached another way is
still the same folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["case_output_files", "check_output_apart"]


def case_output_files(out: Path, case_id: str, label_ext: str) -> list[Path]:
    """Every file ``infer`` may write for one case in ``out``."""
    return [
        out / f"{case_id}{label_ext}",
        out / f"{case_id}.json",
        out / f"{case_id}_probabilities.npy",
        out / f"{case_id}_seg.dcm",
        out / f"{case_id}_labels.json",
    ]


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _is_dicom_file(path: Path) -> bool:
    from ..io.formats import image_extension
    from ..io.image import is_dicom_source

    return path.is_file() and image_extension(path) is None and is_dicom_source(path)


def check_output_apart(
    out: str | os.PathLike[str], input_path: str | os.PathLike[str], cases: Sequence[Any], label_ext: str
) -> None:
    """Refuse (:class:`~segpipe.errors.UsageError`, exit 2) an output folder that is, or lies in, an
    input, or whose files would replace an input file (see the module docstring). ``cases`` are the
    batch's :class:`~segpipe.inference.batch.InputCase` objects (``id``, ``sources``)."""
    target = _real(out)
    given = _real(input_path)
    hint = "choose an output folder apart from the input (-o OUT; by default <INPUT>_segpipe beside it)"
    if target == given:
        what = "the input folder" if given.is_dir() else "the input file"
        raise UsageError(
            f"-o {out}: the output folder is {what} {input_path}: segmenting would write over the inputs", hint=hint
        )
    if given.is_dir() and given in target.parents and not (given / "dataset.json").is_file():
        raise UsageError(
            f"-o {out}: the output folder is inside the input folder {input_path}: "
            "the next run would take it for a case to segment",
            hint=hint,
        )
    folders: list[Path] = []
    files: set[Path] = set()
    for case in cases:
        for src in case.sources:
            real = _real(src)
            if real.is_dir():
                folders.append(real)
            else:
                files.add(real)
                if _is_dicom_file(real):
                    folders.append(real.parent)  # a DICOM file stands for its series' folder
    if given.is_file() and _is_dicom_file(given):
        folders.append(given.parent)
    for folder in dict.fromkeys(folders):
        if target == folder or folder in target.parents:
            raise UsageError(
                f"-o {out}: the output folder is inside the input {folder}: its files would be read as part of it "
                "(a DICOM-SEG would join the series)",
                hint=hint,
            )
    if target in files:
        raise UsageError(f"-o {out}: the output folder is an input file", hint=hint)
    for case in cases:
        for path in case_output_files(target, case.id, label_ext):
            if _real(path) in files:
                raise UsageError(
                    f"-o {out}: in this output folder, case {case.id}'s {path.name} would replace the input file {path}",
                    hint=hint,
                )
