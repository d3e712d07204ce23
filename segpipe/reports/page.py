"""The HTML of segpipe's reports: one self-contained page, readable from a file share.

A report is a single ``.html`` file with its style and its one small script inline (no server, no
external script, font or style sheet: it opens offline, from a network drive, attached to an
email), plus the PNG images it names by relative path beside it. Tables sort by any column (click
a header; numbers sort as numbers, empty cells last). Everything written into the page is escaped.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..colors import label_hex
from ..io.atomic import write_text

__all__ = ["Cell", "esc", "finite", "flag_list", "legend", "page", "section", "table", "write_html"]

CSS = """
:root{--fg:#1d2430;--muted:#5b6678;--line:#d9dee7;--bg:#fff;--head:#f2f4f8;--warn:#a23b00;--bad:#b00020;--ok:#1d7a36}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:var(--fg);background:var(--bg);margin:0 auto;padding:16px 24px;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:var(--muted);margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--head);cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td{white-space:nowrap}td .wrap,td.wrap{white-space:normal}td.n{text-align:right}tr.failed td{background:#fff2f2}
.flag{color:var(--warn)}.bad{color:var(--bad);font-weight:600}.ok{color:var(--ok)}.muted{color:var(--muted)}
.swatch{display:inline-block;width:11px;height:11px;border:1px solid #0004;margin-right:4px;vertical-align:-1px}
.legend span.item{margin-right:14px;white-space:nowrap}figure{display:inline-block;margin:4px 14px 10px 0}
figcaption{color:var(--muted);font-size:12px}img{image-rendering:pixelated;border:1px solid var(--line);background:#000}
.case{margin:10px 0 18px}dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:6px 0}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0}code{background:var(--head);padding:0 3px;border-radius:3px}
"""

# Sort a table by the clicked header: cells carry data-v (a number or text); empty cells go last.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,col){th.addEventListener('click',function(){
  var asc=th.getAttribute('aria-sort')!=='ascending';
  t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
  function key(r){var c=r.cells[col];var v=c?c.getAttribute('data-v'):null;if(v===null||v==='')return null;
   var n=Number(v);return isNaN(n)?v.toLowerCase():n}
  rows.sort(function(a,b){var x=key(a),y=key(b);if(x===y)return 0;if(x===null)return 1;if(y===null)return -1;
   if(typeof x!==typeof y){x=String(x);y=String(y)}return (x<y?-1:1)*(asc?1:-1)});
  rows.forEach(function(r){body.appendChild(r)});
 })});
});
"""


def finite(value: Any) -> float | None:
    """``value`` as a finite float (from a CSV or JSON field), else None (missing, text, NaN, inf)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def esc(value: Any) -> str:
    """``value`` as HTML text (escaped)."""
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class Cell:
    """A table cell: its HTML (already escaped), the value it sorts by, and whether it is a number."""

    html: str
    sort: Any = None
    numeric: bool = False

    @classmethod
    def text(cls, value: Any) -> Cell:
        return cls(esc(value), "" if value is None else str(value))

    @classmethod
    def number(cls, value: float | int | None, digits: int = 2) -> Cell:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return cls("", None, True)
        shown = f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
        return cls(esc(shown), value, True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, table_id: str, row_class: Any = None) -> str:
    """A sortable table; ``row_class(i)`` may give a CSS class per row (``failed``)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = row_class(i) if row_class else None
        tds = "".join(
            f'<td{" class=n" if c.numeric else ""} data-v="{esc("" if c.sort is None else c.sort)}">{c.html}</td>'
            for c in row
        )
        body.append(f"<tr{f' class={esc(cls)}' if cls else ''}>{tds}</tr>")
    return f'<table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def legend(labels: Mapping[int, str]) -> str:
    """The colour legend of a label map's classes (background left out)."""
    items = "".join(
        f'<span class="item"><span class="swatch" style="background:{label_hex(v)}"></span>{v} {esc(n)}</span>'
        for v, n in sorted(labels.items())
        if v > 0
    )
    return f'<p class="legend">{items}</p>'


def flag_list(flags: Sequence[Mapping[str, Any]]) -> str:
    """The flags of a case as an HTML list (empty string when none)."""
    if not flags:
        return ""
    return "<ul>" + "".join(f'<li class="flag">{esc(f.get("message", f.get("kind")))}</li>' for f in flags) + "</ul>"


def section(title: str, *parts: str, anchor: str | None = None) -> str:
    """An ``<h2>`` section."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, sections: Sequence[str], *, subtitle: str = "") -> str:
    """The whole HTML document."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{sub}{''.join(sections)}<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(path: str | os.PathLike[str], text: str) -> Path:
    """Write a report atomically (a reader never sees half a page)."""
    return write_text(Path(path), text)
