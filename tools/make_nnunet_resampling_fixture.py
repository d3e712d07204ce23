"""Write ``tests/data/nnunet_resampling.npz``: small arrays and what nnU-Net v2's own resampling makes of them.

Run with the Python of an environment where nnU-Net v2 is installed (it is not a segpipe dependency):

    ../nnunet-venv/bin/python tools/make_nnunet_resampling_fixture.py

``tests/test_nnunet_models.py`` checks :func:`segpipe.preprocessing.nnunet_resampling.resample_like_nnunet`
against these outputs: isotropic, anisotropic ("separate z", order_z 0 and 1), shrinking and growing axes,
orders 3 (images) and 1 (logits); and label maps (``resize_segmentation``, order 1, its separate-z path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from batchgenerators.augmentations.utils import resize_segmentation
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from scipy import ndimage

CASES = [
    {"shape": [4, 10, 9], "current": [3.0, 0.7, 0.7], "target": [3.0, 0.9, 0.9], "order": 3, "order_z": 0},
    {"shape": [4, 10, 9], "current": [3.0, 0.7, 0.7], "target": [1.5, 0.8, 0.8], "order": 3, "order_z": 0},
    {"shape": [6, 7, 8], "current": [1.0, 1.0, 1.0], "target": [1.3, 0.8, 1.1], "order": 3, "order_z": 0},
    {"shape": [4, 8, 8], "current": [1.5, 0.8, 0.8], "target": [3.0, 0.8, 0.8], "order": 1, "order_z": 0},
    {"shape": [8, 4, 8], "current": [0.7, 3.2, 0.7], "target": [0.8, 2.0, 0.8], "order": 1, "order_z": 1},
    {"shape": [4, 5, 12], "current": [2.0, 2.0, 0.5], "target": [1.0, 1.0, 1.0], "order": 3, "order_z": 0},
]


def main() -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(CASES):
        data = rng.normal(size=[2, *case["shape"]]).astype(np.float32)
        shape = compute_new_shape(data.shape[1:], case["current"], case["target"])
        out = resample_data_or_seg_to_shape(
            data,
            shape,
            case["current"],
            case["target"],
            is_seg=False,
            order=case["order"],
            order_z=case["order_z"],
            force_separate_z=None,
        )
        arrays[f"input_{i}"] = data
        arrays[f"output_{i}"] = np.asarray(out, dtype=np.float32)
    arrays["cases"] = np.array(json.dumps(CASES))
    # label maps (a cascade's previous stage): resize_segmentation, and the separate-z path of label maps
    for i, (shape, new) in enumerate((((6, 8, 7), (9, 11, 5)), ((5, 9, 8), (7, 13, 13)))):
        smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
        labels = (np.digitize(smooth, [-0.1, 0.0, 0.1]) - i).astype(np.int16)  # the second holds -1 too
        arrays[f"labels_in_{i}"] = labels
        arrays[f"labels_out_{i}"] = resize_segmentation(labels, new, order=1)
    seg = arrays["labels_in_0"][None].astype(np.float32)
    arrays["labels_sepz"] = resample_data_or_seg_to_shape(
        seg, (9, 10, 9), (3.0, 0.7, 0.7), (2.0, 0.6, 0.6), is_seg=True, order=1, order_z=0, force_separate_z=None
    )[0]
    out_path = Path(__file__).resolve().parents[1] / "tests" / "data" / "nnunet_resampling.npz"
    np.savez_compressed(out_path, **arrays)
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
