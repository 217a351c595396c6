"""Small self-contained report pages (Markdown and HTML) for places that show a file, not a terminal.

The Kubeflow run page renders a task's Markdown artifact as Markdown and its HTML artifact in a
sandboxed iframe (no network, no scripts needed); so everything a page shows is inline: escaped text,
plain tables, CSS in a <style> block and images as `data:` URIs. Nothing here decides what a report
says; the modules that own the facts (validation, evaluation, the registry gate, retrieval) do.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hivlp.data.images import load_image

THUMBNAIL_PX = 160

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #d0d0d5; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
.warn { color: #9a6700; font-weight: 600; } .muted { color: #6e6e73; }
figure { display: inline-block; margin: .3em; text-align: center; width: 170px; vertical-align: top; }
figure img { border: 3px solid transparent; border-radius: 4px; }
figure.hit img { border-color: #1a7f37; }
figcaption { font-size: .75em; word-break: break-all; }
"""


def esc(value: Any) -> str:
    """Text made safe for HTML (also attribute values)."""
    return html.escape(str(value), quote=True)


def md_cell(value: Any) -> str:
    """Text made safe for one Markdown table cell (pipes and newlines would break the row)."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers at a fixed precision (ints as ints), anything else as text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    rows = [list(r) for r in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
               for i in range(len(headers))]
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(md_cell(fmt(v)) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw_columns: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped except in `raw_columns` (already-built HTML)."""
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            if i in raw_columns:
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def html_page(title: str, body: str) -> str:
    """A complete standalone HTML document around `body` (already-built HTML)."""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def thumbnail_data_uri(path: str | Path, size: int = THUMBNAIL_PX) -> str:
    """A JPEG thumbnail (longest side `size` px) of an image file as a `data:` URI.

    Decoded with the project's one image loader, so a missing, corrupt or oversized file is a
    DatasetError naming it.
    """
    img = load_image(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def markdown_record(title: str, headline: str, record: dict[str, Any]) -> str:
    """A decision or summary as Markdown: a title, a one-line headline, then every field in a table."""
    rows = [(k, fmt(v, 4) if isinstance(v, float) else ("" if v is None else v)) for k, v in record.items()]
    return f"# {md_cell(title)}\n\n**{md_cell(headline)}**\n\n" + markdown_table(["field", "value"], rows) + "\n"
