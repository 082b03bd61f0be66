"""Text-embedding throughput: the Beam RunInference job vs a plain batched loop, same model, same texts.

The input is a multi-domain mix of real conversations from ../shared/data/instructions (maths,
code, role-play, tool use, NLP tasks; ``--n`` in total), ingested into a scratch catalog. Both
sides embed exactly the same texts (``conversation_text`` of every sample, in catalog order) with
the same in-memory all-MiniLM-L6-v2 and the same batch size:

* beam: ``run_text_embedding(..., force=True)``: the whole stage (read shards, RunInference with
  KeyedModelHandler, group per shard, write Parquet, ledger); rows are fed shortest first within
  each shard, so batches hold similar lengths;
* loop: ``embed_texts`` on consecutive slices of ``--batch-size`` texts (what one would write
  by hand), nothing written;
* sorted: one ``embed_texts`` call over everything, which lets sentence-transformers sort all
  texts by length before batching (less padding): a stronger reference than a plain loop.

Runs alternate (beam, loop, sorted, beam, ...) so that machine noise hits all sides alike; the
report gives medians of ``--repeats`` runs, the ratio beam/loop, and peak RSS per side (sampled
every 20 ms). The model load is done once, before timing, and excluded from all sides.

    python benchmarks/embed_text.py                  # 5,000 conversations, 3 repeats
    python benchmarks/embed_text.py --n 1000 --repeats 5 --json /tmp/embed_text.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = REPO.parent / "shared" / "data" / "instructions"
# (file, share of the mix): one format each, so the scratch ingest sees every layout.
MIX = [
    ("gsm8k_train.jsonl.gz", 0.2),
    ("gpteacher_codegen.json.gz", 0.2),
    ("gpteacher_roleplay.json.gz", 0.2),
    ("gpteacher_toolformer.json.gz", 0.2),
    ("self_instruct_t0_train.jsonl.gz", 0.2),
]


class PeakRss:
    """Highest RSS of this process and its children while the block runs (20 ms samples)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = self._proc.memory_info().rss
            for child in self._proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_inputs(folder: Path, n: int) -> Path:
    """Write the first records of each mixed file (same format, uncompressed) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, share in MIX:
        src = SHARED / name
        if not src.is_file():
            raise SystemExit(f"{src} is missing; this benchmark needs ../shared/data (see its README)")
        k = max(1, round(n * share))
        out = folder / name[: -len(".gz")]
        with gzip.open(src, "rt", encoding="utf-8") as fh:
            if name.endswith(".jsonl.gz"):
                lines = [line for _, line in zip(range(k), fh)]
                out.write_text("".join(lines), encoding="utf-8")
            else:
                out.write_text(json.dumps(json.load(fh)[:k]), encoding="utf-8")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="conversations in the mix")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-chars", type=int, default=None, help="default: 4 x the model's max tokens (1024)")
    ap.add_argument("--workers", type=int, default=1, help="Beam workers for the beam side")
    ap.add_argument("--skip-sorted", action="store_true", help="leave out the globally length-sorted reference")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from pipeline.beam.ingest import run_ingest
    from pipeline.embed.handlers import sentence_weights_digest, shared_sentence_model
    from pipeline.embed.sentence import embed_texts
    from pipeline.embed.stage import CHARS_PER_TOKEN, conversation_text, run_text_embedding
    from pipeline.io.catalog import Catalog

    scratch = Path(tempfile.mkdtemp(prefix="thresher-bench-embed-text-"))
    inputs = build_inputs(scratch / "inputs", args.n)
    ing = run_ingest([str(inputs)], scratch / "cat", "bench")
    cat = Catalog.at(scratch / "cat")
    model = shared_sentence_model()
    sentence_weights_digest(model)  # memoised: neither side pays for it
    max_chars = args.max_chars or CHARS_PER_TOKEN * int(model.max_seq_length)
    texts: list[str] = []
    for shard in sorted(cat.samples_partition("instruction", "bench").glob("part-*.parquet")):
        for messages in pq.read_table(shard, columns=["messages"]).column("messages").to_pylist():
            texts.append(conversation_text(messages, max_chars))
    n = len(texts)
    print(f"{n:,} conversations ({ing.counts['samples']:,} samples after ingest of {ing.counts['rows_in']:,} rows), "
          f"mean {sum(map(len, texts)) / n:.0f} chars of text, max_chars {max_chars}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    embed_texts(model, texts[: args.batch_size], batch_size=args.batch_size)  # warm-up (allocator, kernels)

    def beam_run() -> float:
        t0 = time.perf_counter()
        res = run_text_embedding(cat.root, "bench", batch_size=args.batch_size, max_chars=max_chars,
                                 workers=args.workers, force=True)
        elapsed = time.perf_counter() - t0
        assert res.rows == n, (res.rows, n)
        return elapsed

    def loop_run() -> float:
        t0 = time.perf_counter()
        for start in range(0, n, args.batch_size):
            embed_texts(model, texts[start : start + args.batch_size], batch_size=args.batch_size)
        return time.perf_counter() - t0

    def sorted_run() -> float:
        t0 = time.perf_counter()
        embed_texts(model, texts, batch_size=args.batch_size)
        return time.perf_counter() - t0

    sides = {"beam": beam_run, "loop": loop_run}
    if not args.skip_sorted:
        sides["sorted"] = sorted_run
    times: dict[str, list[float]] = {k: [] for k in sides}
    peaks: dict[str, int] = {k: 0 for k in sides}
    for rep in range(args.repeats):
        for name, fn in sides.items():
            with PeakRss() as mem:
                seconds = fn()
            times[name].append(seconds)
            peaks[name] = max(peaks[name], mem.peak)
            print(f"  repeat {rep + 1}: {name:<6} {seconds:8.2f}s  {n / seconds:8.1f} conv/s  "
                  f"peak RSS {mem.peak / 2**20:,.0f} MiB", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n / v for k, v in med.items()}
    print(f"\nmedian of {args.repeats} ({n:,} conversations, batch {args.batch_size}):")
    for name in sides:
        print(f"  {name:<6} {rate[name]:8.1f} conv/s   ({med[name]:.2f}s)   peak RSS {peaks[name] / 2**20:,.0f} MiB")
    ratio = rate["beam"] / rate["loop"]
    print(f"  ratio beam/loop   = {ratio:.3f}  (target >= 0.8)")
    if "sorted" in rate:
        print(f"  ratio beam/sorted = {rate['beam'] / rate['sorted']:.3f}  (reference: global length sort)")
    if args.json:
        args.json.write_text(json.dumps({
            "n": n, "batch_size": args.batch_size, "max_chars": max_chars, "repeats": args.repeats,
            "times_s": times, "median_s": med, "conv_per_s": rate, "peak_rss_bytes": peaks,
            "ratio_beam_loop": ratio, "torch_threads": torch.get_num_threads(),
        }, indent=2))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
