"""Ingest and text embedding: the in-process runner vs Beam's Dask runner on 1 and 2 workers.

The input is ``--n`` real instruction rows (JSONL lines copied unchanged, half from the gsm8k
and half from the self-instruct T0 file of ../shared/data/instructions, or of demo_data/ when that
folder is absent), dealt into ``--files`` files so that the Dask runner has several units of
work (it parallelises over input files and shards; see docs/cluster.md). Each mode ingests them
into a fresh catalog (``--files`` shards) and embeds them with the bundled MiniLM (fp32 weights
and fp32 compute: ``precision="fp32"``, the same in every mode):

- ``inproc``: Beam's in-process FnApiRunner, one worker (the default ``thresher`` run);
- ``dask1`` / ``dask2``: ``--runner dask --dask_client_address ...`` against a
  dask.distributed LocalCluster of 1 or 2 single-threaded worker processes, started (and its
  workers' imports of Beam and torch warmed) before the timing starts.

The driver imports torch and loads the model before the first mode, so no mode pays for that.

Reported per mode and stage: rows/s, the ratio to in-process, and the peak RSS of this process
plus its children (the Dask scheduler and workers are children here). The outputs of every mode
are checked against in-process: same sample ids, vectors within 1e-5.

    python benchmarks/dask_workers.py                   # 2,000 rows
    python benchmarks/dask_workers.py --n 300 --json /tmp/dask_workers.json

Dask worker processes start with OMP_NUM_THREADS=1 (distributed's default), so each runs torch
on one thread, where the in-process run uses every core.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
from peak_rss import PeakRss

SOURCES = ["gsm8k_train.jsonl.gz", "self_instruct_t0_train.jsonl.gz"]


def data_folder() -> Path:
    shared = REPO.parent / "shared" / "data" / "instructions"
    return shared if shared.is_dir() else REPO / "demo_data" / "instructions"


def make_inputs(folder: Path, n: int, files: int, out: Path) -> int:
    """``n`` lines, half from each SOURCES file, dealt into ``files`` JSONL files (one source each:
    the ingest detects a file's layout from its records)."""
    out.mkdir(parents=True, exist_ok=True)
    files = max(files, len(SOURCES))
    total = 0
    for k, name in enumerate(SOURCES):
        want = n // len(SOURCES) + (1 if k < n % len(SOURCES) else 0)
        lines: list[str] = []
        with gzip.open(folder / name, "rt", encoding="utf-8") as f:
            for line in f:
                if len(lines) >= want:
                    break
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
        mine = [i for i in range(files) if i % len(SOURCES) == k]
        for j, i in enumerate(mine):
            (out / f"part{i}.jsonl").write_text("".join(lines[j::len(mine)]), encoding="utf-8")
        total += len(lines)
    return total


def warm(client) -> None:
    """Import Beam, torch and the model in every worker (a fresh worker pays this on its first task)."""

    def load() -> int:
        from pipeline.embed.tiers import load_token_encoder
        from pipeline.stages import embeddings, ingest  # noqa: F401

        load_token_encoder("fp32", None, None, precision="fp32")
        return os.getpid()

    client.run(load)


def run_mode(mode: str, inputs: Path, files: int, root: Path) -> dict:
    from pipeline.stages.embeddings import run_text_embedding
    from pipeline.stages.ingest import run_ingest

    cluster = client = None
    beam_args: list[str] = []
    try:
        if mode.startswith("dask"):
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=int(mode[4:]), threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None)
            client = Client(cluster)
            warm(client)
            beam_args = ["--runner", "dask", "--dask_client_address", cluster.scheduler_address]
        with PeakRss() as rss_ingest:
            t0 = time.perf_counter()
            ing = run_ingest([str(inputs)], root, "bench", num_shards=files, beam_args=beam_args)
            ingest_s = time.perf_counter() - t0
        with PeakRss() as rss_embed:
            t0 = time.perf_counter()
            emb = run_text_embedding(root, "bench", beam_args=beam_args, precision="fp32")
            embed_s = time.perf_counter() - t0
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return {"mode": mode, "rows_in": ing.counts["rows_in"], "samples": ing.counts["samples"],
            "ingest_s": round(ingest_s, 2), "ingest_rows_s": round(ing.counts["rows_in"] / ingest_s, 1),
            "ingest_peak_rss_mb": round(rss_ingest.peak / 2**20),
            "embed_s": round(embed_s, 2), "embed_rows_s": round(emb.rows / embed_s, 2),
            "embed_peak_rss_mb": round(rss_embed.peak / 2**20), "output": emb.output}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="instruction rows (default 2000)")
    ap.add_argument("--files", type=int, default=4, help="input files = shards (default 4)")
    ap.add_argument("--modes", default="inproc,dask1,dask2")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import logging

    import distributed  # noqa: F401 - sets up its loggers on import; quieted below

    from pipeline.embed.tiers import load_token_encoder
    from pipeline.stages.embeddings import read_embeddings

    logging.getLogger("distributed").setLevel(logging.ERROR)  # cluster start/stop chatter
    # torch and the model in the driver before any timing (fp32 compute, as every mode's embed stage)
    load_token_encoder("fp32", None, None, precision="fp32")
    work = Path(tempfile.mkdtemp(prefix="dask_workers_"))
    try:
        folder = data_folder()
        n = make_inputs(folder, args.n, args.files, work / "inputs")
        print(f"{n:,} rows from {folder} in {args.files} files; {os.cpu_count()} cores "
              f"({platform.processor() or platform.machine()}), load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        results = []
        for mode in args.modes.split(","):
            r = run_mode(mode, work / "inputs", args.files, work / mode)
            results.append(r)
            print(f"{mode:7s} ingest {r['ingest_rows_s']:>9,.1f} rows/s ({r['ingest_s']:.1f}s, peak RSS "
                  f"{r['ingest_peak_rss_mb']:,} MB)   embed {r['embed_rows_s']:>7,.2f} rows/s ({r['embed_s']:.1f}s, "
                  f"peak RSS {r['embed_peak_rss_mb']:,} MB)", flush=True)
        base = results[0]
        ids0, v0 = read_embeddings(Path(base["output"]))
        for r in results:
            ids, v = read_embeddings(Path(r["output"]))
            r["same_ids"] = ids == ids0
            r["max_abs_diff"] = float(np.abs(v - v0).max()) if r["same_ids"] and len(v) else None
            r["ingest_ratio"] = round(r["ingest_rows_s"] / base["ingest_rows_s"], 2)
            r["embed_ratio"] = round(r["embed_rows_s"] / base["embed_rows_s"], 2)
            print(f"{r['mode']:7s} vs {base['mode']}: ingest x{r['ingest_ratio']:.2f}, embed x{r['embed_ratio']:.2f}, "
                  f"same ids {r['same_ids']}, max |diff| {r['max_abs_diff']:.2e}")
            if not r["same_ids"] or r["max_abs_diff"] > 1e-5:
                raise SystemExit(f"{r['mode']}: the embeddings differ from {base['mode']}'s")
        if args.json:
            Path(args.json).write_text(json.dumps({"n": n, "files": args.files, "cores": os.cpu_count(),
                                                   "results": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
