"""Label colours: one fixed colour per label value, the same in every report, overlay and file.

Value ``v`` (``v ≥ 1``) takes entry ``(v - 1) mod 20`` of :data:`PALETTE`, twenty colours that
stay apart from each other on a grey image (red, green, blue, yellow, magenta, cyan first, as
3D Slicer and ITK-SNAP colour a first few labels). Background (0) has none.
"""

from __future__ import annotations

__all__ = ["PALETTE", "label_color", "label_hex"]

#: RGB 0-255, in the order label values 1, 2, 3, … take them
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (240, 50, 230),  # magenta
    (70, 240, 240),  # cyan
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (210, 245, 60),  # lime
    (250, 190, 212),  # pink
    (0, 128, 128),  # teal
    (220, 190, 255),  # lavender
    (170, 110, 40),  # brown
    (255, 250, 200),  # beige
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),  # navy
    (128, 128, 128),  # grey
)


def label_color(value: int) -> tuple[int, int, int]:
    """The RGB colour (0-255) of label value ``value`` (≥ 1)."""
    if int(value) < 1:
        raise ValueError(f"label value {value} has no colour (background)")
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def label_hex(value: int) -> str:
    """``#rrggbb`` of label value ``value``."""
    return "#{:02x}{:02x}{:02x}".format(*label_color(value))
