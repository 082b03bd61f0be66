"""``thresher demo``: curate the small real data shipped in ``demo_data/`` end to end, offline."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.curate_image_text import curate_image_text
from flows.curate_instructions import curate_instructions
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


DEMO_MIG_BUDGET = 100
DEMO_CABS = {"superbatch": 60, "filter_ratio": 0.8, "steps": 5}


@flow(name="thresher-demo", log_prints=True)
def demo_flow(catalog: str, workers: int = 1, force: bool = False) -> dict[str, Any]:
    from pipeline.embed.clip import TINY_MODEL

    specs = {s.dataset: s for s in demo_specs()}
    # The curation flows run inline (``.fn``): their tasks are this run's tasks. As subflows each
    # cost ~0.7-1 s of API round trips on the temporary server (a tracking task run, a flow run and
    # its states), more than every stage of an unchanged demo together.
    out: dict[str, Any] = {"ingest": ingest_flow.fn(list(specs.values()), catalog, workers=workers, force=force)}
    out["instructions"] = curate_instructions.fn(specs["demo_instructions"], catalog, DEMO_MIG_BUDGET,
                                                 name="demo_mig", workers=workers, force=force)
    if "demo_nlvr" in specs:
        # No CLIP weights ship: the demo uses a tiny random-init open_clip model for the plumbing
        # (registered with open_clip where it is loaded, so an unchanged run never imports it).
        out["image_text"] = curate_image_text.fn(specs["demo_nlvr"], catalog, model_name=TINY_MODEL,
                                                 workers=workers, force=force, **DEMO_CABS)
    return out


def run_demo(catalog: str, workers: int = 1, force: bool = False) -> int:
    if not (DEMO_DATA / "instructions").is_dir():
        raise FileNotFoundError(f"demo data not found at {DEMO_DATA}; run from a checkout of the repository")
    configure_local_prefect()
    catalog = str(Path(catalog).resolve())
    out = demo_flow(catalog, workers=workers, force=force)
    print("\n=== Thresher demo ===")
    print("ingest:")
    for r in out["ingest"]:
        c = r["counts"]
        status = " (unchanged, skipped)" if r["skipped"] else ""
        print(f"  {r['dataset']:<20} {r['kind']:<12} rows in {c['rows_in']:>6}  samples {c['samples']:>6}  "
              f"rejects {c['rejects']:>4}  duplicates {c['duplicates']:>4}{status}")
    ins = out["instructions"]
    mig = ins["mig"]
    print(f"instructions: MIG picked {mig['budget']} of {mig['n_pool']} samples over {mig['n_labels']} tags "
          f"(E(D) {mig['information']:.1f} vs random {mig['random_information_mean']:.1f}; tag coverage "
          f"{mig['coverage_selected']}/{mig['coverage_pool']}); near-copies excluded: "
          f"{mig['notes'].get('near_duplicates_excluded', 0)}")
    print(f"  curated: {ins['curate']['curated']['path']}  exports: {ins['curate']['exports']}")
    if "image_text" in out:
        img = out["image_text"]
        plan = img["plan"]
        print(f"image-text: CABS-{plan['mode'].upper()} plan of {plan['steps']} steps, super-batch {plan['superbatch']}"
              f" -> batch {plan['batch']}; distinct concepts per batch {plan['cabs']['distinct_concepts']:.1f} "
              f"(IID {plan['iid']['distinct_concepts']:.1f})")
        print(f"  WebDataset shards: {len(img['export']['shards'])} in "
              f"{Path(catalog) / 'exports' / 'demo_nlvr_cabs_dm'}")
    exe = "thresher" if shutil.which("thresher") else os.path.relpath(sys.argv[0])
    print(f"\ncatalog: {catalog}")
    print("try:")
    print(f"  {exe} query --catalog {catalog} counts_by_format")
    print(f"  {exe} query --catalog {catalog} \"SELECT curated, rank, tags, score FROM curated LIMIT 10\"")
    print(f"  {exe} query --catalog {catalog} --list")
    return 0
