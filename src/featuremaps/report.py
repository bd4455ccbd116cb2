"""The HTML report (``index.html``) that ``featuremaps show``, ``compare`` and ``demo`` write: titled
sections of text, pictures and number tables.

One self-contained file when its pictures are small (up to :data:`INLINE_LIMIT`): styles are inline
and every picture is embedded as a PNG data URI (the same bytes that are written beside it), so
the report opens offline, alone, in any browser. Larger reports link the PNG files beside them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .maps import StatsTable
from .runs import Picture

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:2px 0;color:#c9d1e0;font-size:14px}
.warning{background:#b3261e;color:#fff;padding:10px 28px;font-weight:600}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:18px 0;padding:14px 18px}
h2{font-size:18px;margin:4px 0 8px} p.text{margin:4px 0 10px;line-height:1.45;max-width:980px}
figure{margin:10px 0 16px} figure img{max-width:100%;height:auto;border:1px solid #e1e4ea;image-rendering:auto}
figcaption{font-size:13px;color:#555;margin-top:4px}
table.featuremaps-stats{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
table.featuremaps-stats th,table.featuremaps-stats td{padding:3px 8px;border-bottom:1px solid #e6e8ee;text-align:right}
table.featuremaps-stats th:first-child,table.featuremaps-stats td:first-child,
table.featuremaps-stats td:nth-child(2){text-align:left}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;margin:0}
dl.meta dt{color:#9aa6bd} dl.meta dd{margin:0}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


@dataclass(frozen=True)
class Section:
    """A titled part of the report: text, pictures, stats tables."""

    title: str
    text: str = ""
    pictures: Sequence[Picture] = ()
    tables: Sequence[tuple[str, StatsTable]] = ()
    folded: Sequence[Picture] = field(default=())  # pictures behind a "show" toggle (long lists)


#: Above this many bytes of pictures, a report links the PNG files beside it instead of embedding
#: them (a report of every channel of a chain would otherwise be hundreds of MB of base64).
INLINE_LIMIT = 8 * 2**20


def _img(picture: Picture, inline: bool) -> str:
    caption = html.escape(picture.caption or picture.path)
    src = (
        f"data:image/png;base64,{base64.b64encode(picture.encoded()).decode('ascii')}"
        if inline
        else html.escape(picture.path)
    )
    return (
        f"<figure><img src='{src}' alt='{caption}' loading='lazy' "
        f"data-file='{html.escape(picture.path)}'><figcaption>{caption}</figcaption></figure>"
    )


def inline_pictures(sections: Sequence[Section], limit: int | None = None) -> bool:
    """Whether a report of these sections embeds its pictures: when they take at most ``limit``
    bytes (default :data:`INLINE_LIMIT`)."""
    limit = INLINE_LIMIT if limit is None else limit
    return sum(len(p.encoded()) for sec in sections for p in (*sec.pictures, *sec.folded)) <= limit


def build_report(
    *,
    title: str,
    sections: Sequence[Section],
    meta: Mapping[str, str] | None = None,
    warning: str | None = None,
    inline: bool | None = None,
) -> str:
    """The report as one HTML string: one self-contained file with the pictures embedded when they
    are small (``inline=None``: :func:`inline_pictures`), else linking the PNG files written beside
    it (their paths in the folder), which the report then says."""
    if inline is None:
        inline = inline_pictures(sections)
    meta_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in (meta or {}).items())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><dl class='meta'>{meta_html}</dl></header>",
    ]
    if warning:
        parts.append(f"<div class='warning' role='alert'>{html.escape(warning)}</div>")
    parts.append("<main>")
    if not inline:
        parts.append(
            "<p class='text'>The pictures of this report are the PNG files beside it in this folder; keep the folder "
            "together to see them.</p>"
        )
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p class='text'>{html.escape(sec.text)}</p>")
        parts.extend(_img(p, inline) for p in sec.pictures)
        for caption, table in sec.tables:
            parts.append(f"<h3 style='font-size:14px'>{html.escape(caption)}</h3>{table._repr_html_()}")
        if sec.folded:
            parts.append(f"<details><summary>{len(sec.folded)} more pictures</summary>")
            parts.extend(_img(p, inline) for p in sec.folded)
            parts.append("</details>")
        parts.append("</section>")
    parts.append("<footer style='padding:0 28px 20px;color:#888;font-size:12px'>made with featuremaps</footer>")
    parts.append("</main></body></html>")
    return "".join(parts)
