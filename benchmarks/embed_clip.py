"""CLIP-embedding throughput: the Beam RunInference job vs a plain batched loop, same model, same images.

Two settings, both on CPU, both with seeded random weights (no CLIP weights ship offline, and
throughput does not depend on the values of the weights):

* ``tiny``: the registered ``thresher-tiny-vit`` (64 px, 2+2 layers) over the NLVR dev scenes
  (5,934 PNGs with sentences) from ../shared/data: measures the per-image plumbing cost;
* ``vitb32``: ``ViT-B-32`` (224 px, 12+12 layers, 151M parameters) over the 158 DreamBooth photos:
  a realistic CPU figure where the model dominates.

Both sides do the same work on the same rows: decode every image, open_clip preprocessing, image
tower, caption tower, image-caption cosine.

* beam: ``run_clip_embedding(..., force=True)``: the whole stage (read shards, two RunInference
  steps with KeyedModelHandler, group per shard, write image/text/score Parquet, ledger);
* loop: read the sample shards, then ``embed_images`` / ``embed_captions`` over consecutive
  slices of ``--batch-size`` rows and the cosine per row; nothing written.

Runs alternate (beam, loop, beam, ...); medians of ``--repeats`` runs, the ratio beam/loop and peak
RSS (this process and children, sampled every 20 ms). Model loading happens once, before timing.

    python benchmarks/embed_clip.py                       # both settings, 3 repeats
    python benchmarks/embed_clip.py --settings vitb32 --repeats 5 --json /tmp/embed_clip.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peak_rss import PeakRss  # noqa: E402  (a sibling benchmark helper)

SHARED = REPO.parent / "shared" / "data" / "image_text"

SETTINGS = {
    # name: (open_clip model, dataset, ingest args, default batch size)
    "tiny": ("thresher-tiny-vit", "nlvr", ([str(SHARED / "nlvr_dev")], {"container": "nlvr"}), 64),
    "vitb32": ("ViT-B-32", "dreambooth",
               ([str(SHARED / "dreambooth" / "images")],
                {"container": "image_folder", "options": {"caption_from": "dirname"}}), 32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="tiny,vitb32", help="comma-separated: tiny, vitb32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 (tiny), 32 (vitb32)")
    ap.add_argument("--workers", type=int, default=1, help="Beam workers for the beam side")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline.embed.clip import embed_captions, embed_images, shared_clip
    from pipeline.io.catalog import Catalog
    from pipeline.stages.embeddings import cosine_rows, run_clip_embedding
    from pipeline.stages.ingest import run_ingest

    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is missing; this benchmark needs ../shared/data (see its README)")
    scratch = Path(tempfile.mkdtemp(prefix="thresher-bench-embed-clip-"))
    report: dict[str, dict] = {}
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        model_name, dataset, (inputs, ingest_kw), default_batch = SETTINGS[setting]
        batch = args.batch_size or default_batch
        ing = run_ingest(inputs, scratch / "cat", dataset, kind="image_text", **ingest_kw)
        cat = Catalog.at(scratch / "cat")
        shards = sorted(cat.samples_partition("image_text", dataset).glob("part-*.parquet"))
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
        clip = shared_clip(model_name, None)
        clip.weights_digest  # noqa: B018 - computed once here, memoised for the timed runs
        params = sum(p.numel() for p in clip.model.parameters())
        print(f"\n[{setting}] {model_name} ({params / 1e6:.1f}M parameters, {clip.image_size[0]} px) on {n:,} "
              f"{dataset} images ({ing.counts['rejects']} rejects at ingest), batch {batch}")
        warm = pq.read_table(shards[0], columns=["image", "caption"]).slice(0, batch)
        embed_images(clip, warm.column("image").to_pylist(), batch_size=batch)
        embed_captions(clip, warm.column("caption").to_pylist(), batch_size=batch)

        def beam_run() -> float:
            t0 = time.perf_counter()
            res = run_clip_embedding(cat.root, dataset, model_name, batch_size=batch, workers=args.workers,
                                     force=True)
            elapsed = time.perf_counter() - t0
            assert res.image.rows == n, (res.image.rows, n)
            return elapsed

        def loop_run() -> float:
            t0 = time.perf_counter()
            checksum = 0.0
            for shard in shards:
                table = pq.read_table(shard, columns=["sample_id", "caption", "image"])
                images = table.column("image").to_pylist()
                captions = table.column("caption").to_pylist()
                for start in range(0, len(images), batch):
                    img = embed_images(clip, images[start : start + batch], batch_size=batch)
                    txt = embed_captions(clip, captions[start : start + batch], batch_size=batch)
                    checksum += float(cosine_rows(img, txt).sum())
            elapsed = time.perf_counter() - t0
            assert np.isfinite(checksum)
            return elapsed

        sides = {"beam": beam_run, "loop": loop_run}
        times: dict[str, list[float]] = {k: [] for k in sides}
        peaks: dict[str, int] = {k: 0 for k in sides}
        for rep in range(args.repeats):
            for name, fn in sides.items():
                with PeakRss() as mem:
                    seconds = fn()
                times[name].append(seconds)
                peaks[name] = max(peaks[name], mem.peak)
                print(f"  repeat {rep + 1}: {name:<5} {seconds:8.2f}s  {n / seconds:8.1f} images/s  "
                      f"peak RSS {mem.peak / 2**20:,.0f} MiB", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: n / v for k, v in med.items()}
        ratio = rate["beam"] / rate["loop"]
        print(f"  median of {args.repeats}: beam {rate['beam']:.1f} images/s ({med['beam']:.2f}s, peak "
              f"{peaks['beam'] / 2**20:,.0f} MiB), loop {rate['loop']:.1f} images/s ({med['loop']:.2f}s, peak "
              f"{peaks['loop'] / 2**20:,.0f} MiB)")
        print(f"  ratio beam/loop = {ratio:.3f}  (target >= 0.8)")
        report[setting] = {"model": model_name, "dataset": dataset, "n": n, "batch_size": batch,
                           "times_s": times, "median_s": med, "images_per_s": rate, "peak_rss_bytes": peaks,
                           "ratio_beam_loop": ratio}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
