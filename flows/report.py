"""The curation report as a flow step: the HTML page in the catalog, its key figures as a Prefect artifact."""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact


def _artifact_key(*parts: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("report", *parts)).lower()).strip("-")[:100]


@task(name="report")
def report_task(catalog: str, dataset: str, selection: str | None, force: bool = False) -> dict[str, Any]:
    """Write ``<catalog>/reports/<dataset>--<selection>.html`` and attach its key figures to the run.

    Skipped (no artifact) when the page already shows the same committed inputs. The report only
    reads what the stages committed, so a failure here is logged, not raised: the curated data
    and the exports are already in place.
    """
    from pipeline.report import build_report
    from pipeline.report.page import summary_rows

    try:
        path, data = build_report(catalog, dataset, selection, force=force)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        get_run_logger().warning("report for %s / %s not written: %s", dataset, selection, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if data is None:
        return {"path": str(path), "skipped": True}
    table = "\n".join(f"| {k} | {v} |" for k, v in summary_rows(data))
    create_markdown_artifact(
        key=_artifact_key(dataset, selection or ""),
        markdown=(f"# Curation report: {dataset}" + (f" / {selection}" if selection else "")
                  + f"\n\n| | |\n|---|---|\n{table}\n\nEvery plot, in one self-contained page: "
                    f"[{path.name}]({path.as_uri()}) (`{path}`)\n"),
        description=f"Thresher curation report of {dataset}",
    )
    return {"path": str(path), "skipped": False}
