"""HTML pieces shared by the run page and the sweep comparison page: the stylesheet and table cells."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from fedgan_jax.report.labels import format_value

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
     padding:0 16px;color:#222}
h1{font-size:1.4em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.attacker td{color:#b01c1c;font-weight:600} img{max-width:100%;margin:8px 0;border:1px solid #eee}
pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:.8em} .muted{color:#777;font-size:.85em}
.warn{background:#fff3f0;border-left:4px solid #d62728;padding:6px 10px}
code{background:#f3f3f3;padding:0 3px}
"""


def head(title: str) -> str:
  """The opening of a page up to ``<body>``, with the stylesheet.

  Args:
    title: The page title (plain text; escaped here).

  Returns:
    HTML.
  """
  return (
    f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    f"<style>{CSS}</style></head><body>"
  )


def row(cells: Iterable[str], cls: str = "", header: bool = False) -> str:
  """One ``<tr>``: each cell (already HTML) wrapped in ``<td>``/``<th>`` unless it is a ``<td ...>`` itself.

  Args:
    cells: Cell contents as HTML.
    cls: CSS class of the row.
    header: ``<th>`` cells.

  Returns:
    HTML.
  """
  tag = "th" if header else "td"
  attr = f' class="{cls}"' if cls else ""
  return f"<tr{attr}>" + "".join(f"<{tag}>{c}</{tag}>" if not c.startswith("<td") else c for c in cells) + "</tr>"


def num(v: Any, title: str | None = None) -> str:
  """A right-aligned number cell (``format_value``), with an optional hover text.

  Args:
    v: The value.
    title: Hover text (plain text; escaped here).

  Returns:
    HTML.
  """
  attr = f" title='{html.escape(title)}'" if title is not None else ""
  return f'<td class="num"{attr}>{html.escape(format_value(v))}</td>'
