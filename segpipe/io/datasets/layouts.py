"""The dataset layouts :func:`load_dataset` recognises from ``dataset.json`` (MSD, nnU-Net v2 raw,
case-folder; see :mod:`segpipe.io.datasets`), the description validated, and the case ids checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...errors import DatasetError
from ..formats import IMAGE_EXTENSIONS, image_extension
from .model import IGNORE_LABEL, LAYOUTS, Case, Dataset


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Discover the dataset in folder ``path`` and validate its description."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found", hint="check the path")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder", hint="give the dataset folder (the one holding dataset.json)")
    root = root.resolve()
    desc_path = root / "dataset.json"
    if not desc_path.is_file():
        raise DatasetError(
            f"{root}: no dataset.json",
            hint="segpipe reads MSD, nnU-Net v2 raw and case-folder datasets, each described by a dataset.json (see README)",
        )
    try:
        desc = json.loads(desc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{desc_path}: invalid JSON ({exc})", hint="fix the JSON syntax") from None
    if not isinstance(desc, dict):
        raise DatasetError(f"{desc_path}: expected a JSON object at the top level")
    layout = desc.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise DatasetError(f"{desc_path}: unknown layout {layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
    if layout is None:
        if "training" in desc and "modality" in desc:
            layout = "msd"
        elif "channel_names" in desc and "file_ending" in desc:
            layout = "nnunet"
        else:
            raise DatasetError(
                f"{desc_path}: cannot tell the layout",
                hint='MSD needs "modality" and "training"; nnU-Net v2 needs "channel_names" and "file_ending"; '
                'a case-folder dataset needs "layout": "case-folder"',
            )
    loader = {"msd": _load_msd, "nnunet": _load_nnunet, "case-folder": _load_case_folder}[layout]
    ds = loader(root, desc, desc_path)
    external = desc.get("external_links", False)
    if not isinstance(external, bool):
        raise DatasetError(f'{desc_path}: "external_links" must be true or false, got {external!r}')
    if not external:
        _check_links(ds, desc_path)
    check_case_ids(ds.all_cases(), desc_path)
    return ds


def source_files(path: Path) -> list[Path]:
    """The files a case source consists of: the file itself, or every file below a DICOM series folder."""
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def _check_links(ds: Dataset, where: Path) -> None:
    """Refuse a case file (or folder) that is a link leading outside the dataset folder.

    A dataset folder that is itself a link is fine (its root is resolved first); a link inside it
    that leaves it would make segpipe read files the dataset does not hold, so it takes the
    dataset's own ``"external_links": true`` to read linked files from shared storage.
    """
    root = str(ds.root)
    for case in ds.all_cases():
        for path in case.files():
            # a DICOM series folder: each file below it too (a slice may link elsewhere)
            below = sorted(p for p in path.rglob("*") if p.is_symlink()) if path.is_dir() else []
            for entry in [path, *below]:
                target = os.path.realpath(entry)
                if target == root or os.path.commonpath([target, root]) == root:
                    continue
                raise DatasetError(
                    f"{entry}: case {case.id}: this path resolves to {target}, outside the dataset folder",
                    hint='copy the file into the dataset folder, or add "external_links": true to dataset.json '
                    "to read linked files from elsewhere (shared storage)",
                )


def _channels(desc: dict[str, Any], key: str, where: Path) -> dict[int, str]:
    raw = desc.get(key)
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{where}: "{key}" must be a non-empty object like {{"0": "CT"}}')
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            idx = int(k)
        except (TypeError, ValueError):
            raise DatasetError(f'{where}: "{key}" key {k!r} is not a channel number') from None
        if not isinstance(v, str):
            raise DatasetError(f'{where}: "{key}"[{k!r}] must be a string (the channel name), got {v!r}')
        out[idx] = v
    if sorted(out) != list(range(len(out))):
        raise DatasetError(f'{where}: "{key}" channels must be numbered 0..{len(out) - 1}, got {sorted(out)}')
    return dict(sorted(out.items()))


def region_labels(desc: dict[str, Any], where: Path) -> tuple[dict[int, str], dict[str, Any]]:
    """The label values of a region dataset (0 and every value a region names, consecutive) and its
    regions: nnU-Net's ``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], ...}`` with
    ``regions_class_order`` (the value each region writes into a label map, later regions on top)."""
    raw = desc.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{where}: "labels" must be a non-empty object')
    names, regions = [], []
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise DatasetError(f'{where}: "labels"[{name!r}] must be a label value or a list of them, got {value!r}')
        if values == [0]:
            continue  # the background
        if 0 in values:
            raise DatasetError(f"{where}: region {name!r} includes the background (0)", hint="list foreground values")
        names.append(str(name))
        regions.append(sorted(set(values)))
    order = desc.get("regions_class_order")
    if not isinstance(order, list) or len(order) != len(regions):
        raise DatasetError(
            f'{where}: "regions_class_order" must list one label value per region ({len(regions)})',
            hint='e.g. "regions_class_order": [1, 2, 3] for whole tumour, core, enhancing',
        )
    used = sorted({v for r in regions for v in r})
    if used != list(range(1, len(used) + 1)):
        raise DatasetError(f"{where}: the regions' label values must be 1, 2, … without gaps, got {used}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c not in used for c in order):
        raise DatasetError(f'{where}: "regions_class_order" values must be label values the regions use ({used})')
    for name, values, value in zip(names, regions, order):
        if value not in values:  # the value a region writes must be one of its labels (order pairs with "labels")
            raise DatasetError(
                f"{where}: region {name!r} ({values}) writes value {value} (regions_class_order), not one of its labels",
                hint='list regions_class_order in the order of the regions in "labels"',
            )
    labels = {0: "background", **{v: f"label {v}" for v in used}}
    return labels, {"names": names, "regions": regions, "class_order": [int(c) for c in order]}


def _labels(desc: dict[str, Any], where: Path) -> dict[int, str]:
    raw = desc.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{where}: "labels" must be a non-empty object', hint='e.g. {"background": 0, "tumour": 1}')
    out: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, list) or "regions_class_order" in desc:
            raise DatasetError(
                f'{where}: region labels ("{k}": {v}) are not supported',
                hint="give each class its own label value (plain name → integer labels)",
            )
        if isinstance(v, bool):
            raise DatasetError(f'{where}: "labels"[{k!r}] must be an integer or a name, got {v!r}')
        if isinstance(v, int):  # nnU-Net style: name -> value
            name, value = str(k), v
        elif isinstance(v, str):  # MSD style: "value" -> name
            try:
                value = int(k)
            except ValueError:
                raise DatasetError(f'{where}: "labels" entry {k!r}: {v!r} is neither name→int nor "int"→name') from None
            name = v
        else:
            raise DatasetError(f'{where}: "labels"[{k!r}] must be an integer or a name, got {v!r}')
        if value < 0 or value in out:
            raise DatasetError(f'{where}: label value {value} ("{name}") is negative or used twice')
        out[value] = name
    if sorted(out) != list(range(len(out))):
        raise DatasetError(
            f"{where}: label values must be 0 (background), 1, 2, … without gaps, got {sorted(out)}",
            hint="renumber the labels consecutively",
        )
    ignored = [v for v, n in out.items() if n.lower() == IGNORE_LABEL]
    if ignored and (ignored[0] != max(out) or ignored[0] == 0 or len(ignored) > 1):
        raise DatasetError(
            f'{where}: the "ignore" label must be one label with the highest value (got {ignored[0]} of 0..{max(out)})',
            hint=f'give "ignore" the value {max(out)} and renumber the others below it',
        )
    if ignored and len(out) < 3:
        raise DatasetError(
            f'{where}: besides background and "ignore" there is no class to segment',
            hint="declare the foreground classes' labels",
        )
    return dict(sorted(out.items()))


def _inside(root: Path, rel: Any, entry: str, where: Path) -> Path:
    """Resolve a description path, refusing wrong types and paths outside the dataset folder."""
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: {entry} must be a path string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise DatasetError(
            f"{where}: {entry} {rel!r} is an absolute path", hint="use a path relative to the dataset folder"
        )
    full = os.path.normpath(os.path.join(root, rel))
    if full == str(root) or os.path.commonpath([full, str(root)]) != str(root):
        raise DatasetError(
            f"{where}: {entry} {rel!r} escapes the dataset folder", hint="keep every file inside the dataset folder"
        )
    return Path(full)


def _exists(path: Path, entry: str, where: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"{where}: {entry} {path} does not exist", hint="fix the entry or restore the file")
    return path


def _case_id_from_file(path: Path) -> str:
    ext = image_extension(path)
    return path.name[: -len(ext)] if ext else path.stem


def _load_msd(root: Path, desc: dict[str, Any], where: Path) -> Dataset:
    channels = _channels(desc, "modality", where)
    labels = _labels(desc, where)
    training = desc.get("training")
    if not isinstance(training, list):
        raise DatasetError(f'{where}: "training" must be a list of {{"image", "label"}} objects')
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
            raise DatasetError(f'{where}: training[{i}] must be an object with "image" and "label", got {entry!r}')
        img = _exists(_inside(root, entry["image"], f"training[{i}].image", where), f"training[{i}].image", where)
        lab = _exists(_inside(root, entry["label"], f"training[{i}].label", where), f"training[{i}].label", where)
        cases.append(Case(_case_id_from_file(img), (img,), lab))
    test = desc.get("test", [])
    if not isinstance(test, list):
        raise DatasetError(f'{where}: "test" must be a list of image paths')
    tests = []
    for i, rel in enumerate(test):
        if isinstance(rel, dict) and "image" in rel:
            rel = rel["image"]
        img = _exists(_inside(root, rel, f"test[{i}]", where), f"test[{i}]", where)
        tests.append(Case(_case_id_from_file(img), (img,), None))
    dim = 2 if str(desc.get("tensorImageSize", "3D")).upper() == "2D" else 3
    return Dataset(
        root.name,
        root,
        "msd",
        channels,
        labels,
        sorted(cases, key=lambda c: c.id),
        sorted(tests, key=lambda c: c.id),
        dimension=dim,
        channels_in_one_file=True,
    )


def _load_nnunet(root: Path, desc: dict[str, Any], where: Path) -> Dataset:
    channels = _channels(desc, "channel_names", where)
    raw_labels = desc.get("labels")
    regions = None
    if "regions_class_order" in desc or (
        isinstance(raw_labels, dict) and any(isinstance(v, list) for v in raw_labels.values())
    ):
        labels, regions = region_labels(desc, where)
    else:
        labels = _labels(desc, where)
    ending = desc.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(f'{where}: "file_ending" must be a string like ".nii.gz", got {ending!r}')
    if ending.lower() not in IMAGE_EXTENSIONS:
        raise DatasetError(
            f"{where}: file_ending {ending!r} is not supported", hint=f"use one of {', '.join(IMAGE_EXTENSIONS)}"
        )

    def scan(folder: Path, need_label: bool) -> list[Case]:
        if not folder.is_dir():
            return []
        groups: dict[str, dict[int, Path]] = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(ending):
                continue
            stem = f.name[: -len(ending)]
            cid, sep, ch = stem.rpartition("_")
            if not sep or len(ch) != 4 or not ch.isdigit():
                raise DatasetError(
                    f"{f}: image file name does not end in _XXXX{ending}",
                    hint=f"name channel files CASE_0000{ending}, CASE_0001{ending}, …",
                )
            groups.setdefault(cid, {})[int(ch)] = f
        out = []
        for cid, files in sorted(groups.items()):
            missing = [c for c in channels if c not in files]
            extra = [c for c in files if c not in channels]
            if missing or extra:
                names = [f"{cid}_{c:04d}{ending}" for c in (missing or extra)]
                raise DatasetError(
                    f"{folder}: case {cid} {'lacks' if missing else 'has undeclared'} channel file(s) {', '.join(names)}",
                    hint=f"each case needs exactly the channels of channel_names ({len(channels)})",
                )
            label = None
            if need_label:
                label = root / "labelsTr" / f"{cid}{ending}"
                if not label.is_file():
                    raise DatasetError(
                        f"{label}: label of case {cid} not found", hint="add the label or remove the case's images"
                    )
            out.append(Case(cid, tuple(files[c] for c in sorted(files)), label))
        return out

    cases = scan(root / "imagesTr", True)
    _check_file_ending(root / "imagesTr", ending, len(cases), where)
    if (root / "labelsTr").is_dir():
        ids = {c.id for c in cases}
        for f in sorted((root / "labelsTr").iterdir()):
            if f.name.endswith(ending) and f.name[: -len(ending)] not in ids:
                raise DatasetError(
                    f"{f}: label without images in imagesTr", hint="add the case's images or remove the label"
                )
    n = desc.get("numTraining")
    if n is not None and (not isinstance(n, int) or n != len(cases)):
        raise DatasetError(
            f'{where}: "numTraining" is {n!r} but imagesTr holds {len(cases)} cases',
            hint="update numTraining or restore the missing cases",
        )
    tests = scan(root / "imagesTs", False)
    _check_file_ending(root / "imagesTs", ending, len(tests), where)
    return Dataset(root.name, root, "nnunet", channels, labels, cases, tests, regions=regions)


def _check_file_ending(folder: Path, ending: str, found: int, where: Path) -> None:
    """Refuse a folder whose files all end differently from the declared ``file_ending``."""
    if found or not folder.is_dir():
        return
    endings: dict[str, int] = {}
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith("."):
            end = image_extension(f) or "".join(f.suffixes[-2:]) or "(no ending)"
            endings[end] = endings.get(end, 0) + 1
    if not endings:
        return
    listed = ", ".join(f"{e} ({n})" for e, n in sorted(endings.items(), key=lambda kv: -kv[1]))
    usable = [e for e in sorted(endings, key=lambda e: -endings[e]) if e.lower() in IMAGE_EXTENSIONS]
    hint = (
        f'set "file_ending" to "{usable[0]}" in dataset.json'
        if usable
        else f'convert the images to one of {", ".join(IMAGE_EXTENSIONS)} and set "file_ending" to match'
    )
    raise DatasetError(
        f"{where}: file_ending {ending!r} matches none of the {sum(endings.values())} files in {folder.name} "
        f"(endings found: {listed})",
        hint=hint,
    )


def _load_case_folder(root: Path, desc: dict[str, Any], where: Path) -> Dataset:
    channels = _channels(desc, "channel_names", where)
    labels = _labels(desc, where)
    image = desc.get("image")
    image_names = image if isinstance(image, list) else [image]
    if not image_names or not all(isinstance(n, str) and n for n in image_names):
        raise DatasetError(
            f'{where}: "image" must be a file/folder name or a list of names (one per channel), got {image!r}'
        )
    label_name = desc.get("label")
    if label_name is not None and not isinstance(label_name, str):
        raise DatasetError(f'{where}: "label" must be a file name, got {label_name!r}')
    if len(image_names) != len(channels) and not (len(image_names) == 1 and len(channels) > 1):
        raise DatasetError(
            f'{where}: "image" names {len(image_names)} files but channel_names declares {len(channels)} channels'
        )
    listed = desc.get("cases")
    if listed is None:
        case_ids = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    elif isinstance(listed, list) and all(isinstance(c, str) for c in listed):
        case_ids = list(listed)
    else:
        raise DatasetError(f'{where}: "cases" must be a list of case folder names')
    cases, tests = [], []
    for i, cid in enumerate(case_ids):
        folder = _inside(root, cid, f"cases[{i}]", where)
        if not folder.is_dir():
            raise DatasetError(
                f"{where}: case folder {folder} does not exist", hint="fix the cases list or add the folder"
            )
        imgs = tuple(
            _exists(_inside(folder, n, f"case {cid} image", where), f"case {cid} image", where) for n in image_names
        )
        lab = _inside(folder, label_name, f"case {cid} label", where) if label_name else None
        if lab is not None and lab.exists():
            cases.append(Case(cid, imgs, lab))
        else:
            tests.append(Case(cid, imgs, None))
    dicom = desc.get("dicom", {})
    if not isinstance(dicom, dict):
        raise DatasetError(f'{where}: "dicom" must be an object of DICOM read options')
    mapping = desc.get("seg_mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise DatasetError(f'{where}: "seg_mapping" must map segment labels/numbers to label values')
    priority = desc.get("seg_priority")
    if priority is not None and not isinstance(priority, list):
        raise DatasetError(f'{where}: "seg_priority" must be a list (highest priority first)')
    return Dataset(
        root.name,
        root,
        "case-folder",
        channels,
        labels,
        cases,
        tests,
        channels_in_one_file=len(image_names) == 1 and len(channels) > 1,
        dicom_options=dict(dicom),
        seg_mapping=mapping,
        seg_priority=priority,
    )


# Suffixes that mark a case's label file in preprocessed caches (``<case>_seg.npy``: segpipe's flat
# cache layout, nnU-Net's cache): an id equal to another id plus one of them reads as that case's label.
CACHE_SUFFIXES = ("_seg",)


def _source_name(case: Case) -> str:
    return case.images[0].name if case.images else case.id


def check_case_ids(cases: list[Case], where: str | os.PathLike[str]) -> None:
    """Refuse case ids that cannot name files safely: duplicates, ids that collide once letter case is
    ignored (case-insensitive file systems) or once a cache suffix is added (``X`` and ``X_seg``), and
    ids holding path separators, control characters or a leading dot.
    """
    rename = "rename one of the two cases (its files or folder, and its entry in dataset.json)"
    for c in cases:
        why = None
        if not c.id.strip():
            why = "is empty"
        elif "/" in c.id or "\\" in c.id:
            why = "holds a path separator"
        elif c.id.startswith("."):
            why = "starts with a dot (a hidden file name)"
        elif any(ord(ch) < 32 for ch in c.id):
            why = "holds a control character"
        if why:
            raise DatasetError(
                f"{where}: case id {c.id!r} ({_source_name(c)}) {why}; it cannot name a file of its own",
                hint="rename the case (its file or folder, and its entry in dataset.json)",
            )
    seen: dict[str, Case] = {}
    folded: dict[str, Case] = {}
    for c in cases:
        if c.id in seen:
            raise DatasetError(
                f"{where}: duplicate case id {c.id!r} ({_source_name(seen[c.id])} and {_source_name(c)})",
                hint="give every case a unique file name",
            )
        other = folded.get(c.id.casefold())
        if other is not None:
            raise DatasetError(
                f"{where}: case ids {other.id!r} and {c.id!r} differ only in letter case; "
                "they name the same files on case-insensitive file systems",
                hint=f"{rename} so that the ids differ in more than letter case",
            )
        seen[c.id] = c
        folded[c.id.casefold()] = c
    for c in cases:
        for suffix in CACHE_SUFFIXES:
            if len(c.id) > len(suffix) and c.id.casefold().endswith(suffix):
                base = folded.get(c.id[: -len(suffix)].casefold())
                if base is not None:
                    raise DatasetError(
                        f"{where}: case ids {base.id!r} and {c.id!r} are ambiguous: {c.id!r} reads as the label "
                        f"file of case {base.id!r} in a preprocessed cache ({suffix!r} marks label files)",
                        hint=f"{rename}, e.g. {c.id[: -len(suffix)] + suffix.replace('_', '-')!r}",
                    )
