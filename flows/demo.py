"""``thresher demo``: curate the small real data shipped in ``demo_data/`` end to end, offline."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from prefect import flow

from flows.ingest import IngestSpec, ingest_flow
from flows.settings import configure_local_prefect

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"


def demo_specs(root: Path = DEMO_DATA) -> list[IngestSpec]:
    specs = [IngestSpec("demo_instructions", [str(root / "instructions")], kind="instruction")]
    images = root / "image_text"
    if (images / "dreambooth").is_dir():
        specs.append(IngestSpec("demo_dreambooth", [str(images / "dreambooth" / "images")], kind="image_text",
                                container="image_folder", options={"caption_from": "dirname"}))
    if (images / "small_dupes").is_dir():
        specs.append(IngestSpec("demo_small_dupes", [str(images / "small_dupes")], kind="image_text",
                                container="image_folder"))
    if (images / "nlvr_dev").is_dir():
        specs.append(IngestSpec("demo_nlvr", [str(images / "nlvr_dev")], kind="image_text", container="nlvr"))
    return specs


@flow(name="thresher-demo", log_prints=True)
def demo_flow(catalog: str, workers: int = 1, force: bool = False) -> list[dict]:
    return ingest_flow(demo_specs(), catalog, workers=workers, force=force)


def run_demo(catalog: str, workers: int = 1, force: bool = False) -> int:
    if not (DEMO_DATA / "instructions").is_dir():
        raise FileNotFoundError(f"demo data not found at {DEMO_DATA}; run from a checkout of the repository")
    configure_local_prefect()
    catalog = str(Path(catalog).resolve())
    results = demo_flow(catalog, workers=workers, force=force)
    print("\n=== Thresher demo ===")
    for r in results:
        c = r["counts"]
        status = " (unchanged, skipped)" if r["skipped"] else ""
        print(f"{r['dataset']:<20} {r['kind']:<12} rows in {c['rows_in']:>6}  samples {c['samples']:>6}  "
              f"rejects {c['rejects']:>4}  duplicates {c['duplicates']:>4}{status}")
    exe = "thresher" if shutil.which("thresher") else os.path.relpath(sys.argv[0])
    print(f"\ncatalog: {catalog}")
    print("try:")
    print(f"  {exe} query --catalog {catalog} counts_by_format")
    print(f"  {exe} query --catalog {catalog} \"SELECT source_format, count(*) FROM samples GROUP BY ALL\"")
    print(f"  {exe} query --catalog {catalog} --list")
    return 0
