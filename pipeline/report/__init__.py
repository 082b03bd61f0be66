"""``thresher report``: one self-contained HTML page of plots about a dataset and a selection.

:func:`build_report` reads the catalog (:mod:`pipeline.report.collect`), draws the plots
(:mod:`pipeline.report.figures`) and writes the page (:mod:`pipeline.report.page`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.report.collect import ReportData, collect
from pipeline.report.page import FINGERPRINT_META, write


def default_path(catalog: str | Path, dataset: str, selection: str | None) -> Path:
    name = f"{dataset}--{selection}.html" if selection else f"{dataset}.html"
    return Path(catalog).expanduser().resolve() / "reports" / name


def inputs_fingerprint(catalog: str | Path, dataset: str, selection: str | None) -> str:
    """Size and mtime of every committed file the report reads (a few stat calls, no reads)."""
    root = Path(catalog).expanduser().resolve()
    patterns = [f"samples/*/dataset={dataset}/*", f"rejects/dataset={dataset}/*", f"duplicates/dataset={dataset}/*",
                f"annotations/*/dataset={dataset}/*", f"embeddings/*/dataset={dataset}/*"]
    if selection:
        patterns += [f"selections/{selection}/*", f"selections/{selection}.*", f"curated/{selection}/*"]
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            st = path.stat()
            digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def is_current(path: Path, fingerprint: str) -> bool:
    """True when ``path`` is a report written from inputs with this fingerprint (read from its head)."""
    try:
        with path.open("r", encoding="utf-8") as f:
            head = f.read(2048)
    except (OSError, UnicodeDecodeError):
        return False
    return f'<meta name="{FINGERPRINT_META}" content="{fingerprint}">' in head


def build_report(catalog: str | Path, dataset: str, selection: str | None = None, out: str | Path | None = None,
                 force: bool = True) -> tuple[Path, ReportData | None]:
    """Write the report of ``dataset`` (and ``selection``) to ``out`` (default
    ``<catalog>/reports/<dataset>[--<selection>].html``). Returns the path and the data drawn, or
    None for the data when ``force`` is off and the page already shows these exact inputs."""
    out = Path(out) if out is not None else default_path(catalog, dataset, selection)
    fingerprint = inputs_fingerprint(catalog, dataset, selection)
    if not force and is_current(out, fingerprint):
        return out, None
    data = collect(catalog, dataset, selection)
    return write(data, out, fingerprint), data


__all__ = ["ReportData", "build_report", "collect", "default_path"]
