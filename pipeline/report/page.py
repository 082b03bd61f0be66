"""One self-contained HTML page: plotly.js inline, thumbnails as data URIs, nothing fetched at view time."""

from __future__ import annotations

import datetime as _dt
import html
import os
import tempfile
from pathlib import Path

from pipeline.report import figures
from pipeline.report.collect import MEMBERS_SHOWN, ReportData

FINGERPRINT_META = "thresher-inputs"  # the inputs' fingerprint, early in <head> so a skip reads 2 KB

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #212529; }
h1 { margin-bottom: .2rem; } .sub { color: #6c757d; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; } td, th { padding: .25rem .6rem; text-align: left; }
tr:nth-child(even) { background: #f1f3f5; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.group { border: 1px solid #dee2e6; border-radius: 6px; padding: .5rem .8rem; margin: .6rem 0; }
.group img { margin: 2px; border: 2px solid transparent; } .group img.kept { border-color: #d9480f; }
.kept-text { font-weight: 600; } .figure { margin: 1rem 0; }
"""


def summary_rows(d: ReportData) -> list[tuple[str, str]]:
    """The key figures, as (label, value) pairs: the page's first table and the flow's artifact."""
    rows = [("dataset", d.dataset), ("kind", d.kind), ("input rows", f"{d.accounting['rows_in']:,}"),
            ("samples", f"{d.n_samples:,}"), ("rejects", f"{d.accounting['rejects']:,}"),
            ("exact duplicates", f"{d.accounting['duplicates']:,}")]
    if d.selection:
        rows += [("selection", d.selection), ("selected", f"{len(d.selected):,} ({len(d.selected) / d.n_samples:.1%})")]
    for key in ("information", "random_information_mean", "coverage_selected", "coverage_pool", "zero_gain_picks"):
        if key in d.selection_report:
            value = d.selection_report[key]
            rows.append((key.replace("_", " "), f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"))
    return rows


def _summary(d: ReportData) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class='num'>{html.escape(str(v))}</td></tr>"
                   for k, v in summary_rows(d))
    return f"<table>{body}</table>"


def _groups(d: ReportData) -> str:
    if not d.groups:
        return ""
    parts = ["<h2>Near-duplicate groups</h2><p class='sub'>The largest groups; the kept copy comes first "
             "(outlined / bold).</p>"]
    for g in d.groups:
        items = []
        for k, (sample_id, preview) in enumerate(g["members"][:MEMBERS_SHOWN]):
            title = html.escape(sample_id, quote=True)
            if preview.startswith("data:image/"):
                items.append(f"<img src='{preview}' title='{title}' alt='{title}'{' class=kept' if k == 0 else ''}>")
            else:
                cls = " class='kept-text'" if k == 0 else ""
                items.append(f"<li{cls} title='{title}'>{html.escape(preview or sample_id)}</li>")
        inner = "".join(items) if d.kind == "image_text" else f"<ul>{''.join(items)}</ul>"
        more = f"<p class='sub'>... and {g['size'] - MEMBERS_SHOWN} more</p>" if g["size"] > MEMBERS_SHOWN else ""
        parts.append(f"<div class='group'><b>{g['size']} samples</b>, max cosine {g['max_similarity']:.3f}"
                     f"{inner}{more}</div>")
    return "".join(parts)


def render(d: ReportData, fingerprint: str = "") -> str:
    import plotly.offline

    figs = [f for f in (make(d) for make in figures.ALL) if f is not None]
    divs = "".join(f"<div class='figure'>{fig.to_html(full_html=False, include_plotlyjs=False)}</div>" for fig in figs)
    title = f"Thresher report: {d.dataset}" + (f" / {d.selection}" if d.selection else "")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f'<meta name="{FINGERPRINT_META}" content="{html.escape(fingerprint, quote=True)}">'
            f"<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='sub'>catalog {html.escape(d.catalog)} &middot; {stamp}</p>"
            f"{_summary(d)}{divs}{_groups(d)}</body></html>")


def write(d: ReportData, path: str | Path, fingerprint: str = "") -> Path:
    """Write the page atomically (a reader never sees half a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # a page to share, not a secret (mkstemp makes it 0600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(d, fingerprint))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
