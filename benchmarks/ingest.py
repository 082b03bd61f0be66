"""Ingest throughput: the Beam job (in-process and 2 workers) vs a plain single-process loop.

Both sides do exactly the same work: read the file, parse and normalise every record
(``pipeline.io.records.parse_chunk``), drop exact duplicates and write zstd Parquet shards. Each
run happens in a fresh subprocess; peak memory is the highest summed RSS of that process and its
children (Beam's worker processes), sampled every 50 ms.

    python benchmarks/ingest.py                       # the 55k-row self-instruct file, 3 repeats
    python benchmarks/ingest.py --input FILE --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "instructions" / "self_instruct_t0_train.jsonl.gz"

PLAIN_LOOP = r"""
import sys, time
from collections import defaultdict
from pathlib import Path
import pyarrow as pa
import schemas
from pipeline.io.catalog import shard_name, table_from_rows, write_parquet_atomic
from pipeline.io.records import parse_chunk
from pipeline.io.sample_id import shard_of
from pipeline.io.sources import plan_units, read_chunks
from pipeline.stages.ingest import _dedup

src, out, shards = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
rows_in, by_shard, rejects = 0, defaultdict(list), []
for unit in plan_units(src.split(","), "instruction"):
    for chunk in read_chunks(unit):
        rows_in += chunk.rows_in
        parsed = parse_chunk(chunk)
        for row in parsed.samples:
            by_shard[shard_of(row["sample_id"], shards)].append(row)
        rejects.extend(r.as_row() for r in parsed.rejects)
kept = dupes = 0
for shard, rows in sorted(by_shard.items()):
    table, dup = _dedup(table_from_rows(rows, schemas.INSTRUCTION_SAMPLES), "instruction")
    write_parquet_atomic(table, out / shard_name(shard, shards), schemas.INSTRUCTION_SAMPLES)
    kept += table.num_rows
    dupes += dup.num_rows
if rejects:
    write_parquet_atomic(table_from_rows(rejects, schemas.REJECTS), out / "rejects.parquet", schemas.REJECTS)
print("RESULT", rows_in, kept, dupes, len(rejects), time.perf_counter() - t0)
"""

BEAM_JOB = r"""
import logging, sys, time
logging.disable(logging.WARNING)
from pipeline.stages.ingest import run_ingest
src, out, shards, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
r = run_ingest(src.split(","), out, "bench", num_shards=shards, workers=workers, force=True)
c = r.counts
print("RESULT", c["rows_in"], c["samples"], c["duplicates"], c["rejects"], time.perf_counter() - t0)
"""

# The runner's fixed cost: the same runner mode on a trivial pipeline (for multi-processing this
# is mostly starting the SDK worker processes, each importing Beam).
STARTUP = r"""
import logging, sys, time
logging.disable(logging.WARNING)
import apache_beam as beam
from pipeline.stages.runner import make_pipeline_options, run_pipeline
workers = int(sys.argv[1])
t0 = time.perf_counter()
run_pipeline(lambda p: p | beam.Create([1, 2]) | beam.Reshuffle() | beam.Map(lambda x: (x % 2, x))
             | beam.GroupByKey(), make_pipeline_options(workers))
print("RESULT 0 0 0 0", time.perf_counter() - t0)
"""


def _run(code: str, args: list[str]) -> tuple[dict, float]:
    """Run ``code`` in a fresh interpreter; return its RESULT line and the peak tree RSS in MiB."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    rows_in, samples, dupes, rejects, secs = line.split()[1:]
    return ({"rows_in": int(rows_in), "samples": int(samples), "duplicates": int(dupes),
             "rejects": int(rejects), "seconds": float(secs)}, peak / 2**20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--copies", type=int, default=1,
                    help="ingest K copies of the input (K x the rows; copies are duplicates)")
    args = ap.parse_args()
    if not args.input.exists():
        print(f"input {args.input} not found (the shared data folder sits beside the repo)", file=sys.stderr)
        return 2
    links = tempfile.TemporaryDirectory()
    inputs = [str(args.input)]
    for k in range(1, args.copies):
        link = Path(links.name) / f"copy{k}-{args.input.name}"
        shutil.copyfile(args.input, link)  # a real copy: symlinks resolve to one input
        inputs.append(str(link))
    src = ",".join(inputs)
    configs = [("plain loop (1 process)", PLAIN_LOOP, []),
               ("Beam in-process (1 worker)", BEAM_JOB, ["1"]),
               ("Beam multi-processing (2 workers)", BEAM_JOB, ["2"])]
    results: dict[str, list[tuple[dict, float]]] = {name: [] for name, _, _ in configs}
    for rep in range(args.repeats):
        for name, code, extra in configs:  # interleaved, so machine noise hits every config alike
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(_run(code, [src, tmp, str(args.shards), *extra]))
    startup = {w: statistics.median(_run(STARTUP, [str(w)])[0]["seconds"] for _ in range(args.repeats))
               for w in (1, 2)}
    print(f"input: {args.input} x {args.copies} ({args.copies * args.input.stat().st_size / 2**20:.1f} MiB), "
          f"{args.repeats} repeats, {args.shards} shards; wall time inside each process (imports excluded)")
    print(f"runner start-up (trivial pipeline, median): in-process {startup[1]:.2f} s, "
          f"2 worker processes {startup[2]:.2f} s")
    print(f"{'config':<36}{'rows in':>9}{'samples':>9}{'median s':>10}{'rows/s':>10}"
          f"{'rows/s w/o start-up':>21}{'peak RSS MiB':>14}")
    summary = {}
    for name, runs in results.items():
        counts = runs[0][0]
        med = statistics.median(r["seconds"] for r, _ in runs)
        peak = max(p for _, p in runs)
        rate = counts["rows_in"] / med
        summary[name] = rate
        assert all(r["samples"] == counts["samples"] for r, _ in runs), "runs disagree on the output"
        fixed = 0.0 if name.startswith("plain") else startup[2 if "2 workers" in name else 1]
        steady = counts["rows_in"] / max(med - fixed, 1e-9)
        print(f"{name:<36}{counts['rows_in']:>9,}{counts['samples']:>9,}{med:>10.2f}{rate:>10,.0f}"
              f"{steady:>21,.0f}{peak:>14,.0f}")
    base = summary["plain loop (1 process)"]
    for name, rate in summary.items():
        print(f"ratio {name} / plain loop: {rate / base:.2f}x")
    print(json.dumps({"rows_per_s": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
