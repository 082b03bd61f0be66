"""``thresher report``: one self-contained HTML page of plots about a dataset and a selection.

:func:`build_report` reads the catalog (:mod:`pipeline.report.collect`), draws the plots
(:mod:`pipeline.report.figures`) and writes the page (:mod:`pipeline.report.page`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report.collect import ReportData, collect
from pipeline.report.page import write


def build_report(catalog: str | Path, dataset: str, selection: str | None = None, out: str | Path | None = None) -> Path:
    """Write the report of ``dataset`` (and ``selection``) to ``out`` (default
    ``<catalog>/reports/<dataset>[--<selection>].html``) and return its path."""
    data = collect(catalog, dataset, selection)
    if out is None:
        out = Path(data.catalog) / "reports" / (f"{dataset}--{selection}.html" if selection else f"{dataset}.html")
    return write(data, out)


__all__ = ["ReportData", "build_report", "collect"]
