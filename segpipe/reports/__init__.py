"""Reports for people: self-contained HTML pages and the overlays they show.

:mod:`.page` builds the pages (sortable tables, legends, flags; inline style and script, nothing
fetched), :mod:`.overlay` the three-plane label overlays (palette PNGs). What each report holds is
decided where its data lives: the batch report in :mod:`segpipe.inference.batch_report`, the
training run's in :mod:`segpipe.training.run_report`, ``evaluate``'s and ``find-best``'s in
:mod:`segpipe.workflows.report`.
"""

from .overlay import PLANES, canonical, centre_of, encode_png, three_planes
from .page import Cell, esc, finite, flag_list, legend, page, section, table, write_html

__all__ = [
    "PLANES",
    "Cell",
    "canonical",
    "centre_of",
    "encode_png",
    "esc",
    "finite",
    "flag_list",
    "legend",
    "page",
    "section",
    "table",
    "three_planes",
    "write_html",
]
