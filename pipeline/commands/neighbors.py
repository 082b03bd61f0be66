"""thresher neighbors: the samples nearest to one sample, with a snippet of each."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import add_catalog_argument

NAME = "neighbors"
HELP = "print the nearest neighbours of a sample from a dataset's FAISS index"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sample_id")
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="embeddings folder name the index was built from")
    p.add_argument("-k", type=int, default=10, help="neighbours to show (the sample itself comes first)")
    p.add_argument("--width", type=int, default=90, help="characters of text per snippet")


def snippets(catalog: str | Path, dataset: str, sample_ids: list[str], width: int = 90) -> dict[str, str]:
    """sample_id -> a one-line excerpt: the first user turn (instructions) or the caption (image-text)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.io.catalog import Catalog

    cat = Catalog.at(catalog)
    wanted = set(sample_ids)
    out: dict[str, str] = {}
    for kind, column in (("instruction", "messages"), ("image_text", "caption")):
        partition = cat.samples_partition(kind, dataset)
        for shard in sorted(partition.glob("part-*.parquet")) if partition.is_dir() else []:
            table = pq.read_table(shard, columns=["sample_id", column])
            table = table.filter(pc.is_in(table.column("sample_id"), value_set=_value_set(wanted)))
            for sid, value in zip(table.column("sample_id").to_pylist(), table.column(column).to_pylist()):
                if kind == "instruction":
                    text = next((m["content"] for m in value or [] if m.get("role") == "user"), "")
                else:
                    text = value or ""
                text = " ".join(text.split())
                out[sid] = text if len(text) <= width else text[: width - 1] + "…"
    return out


def _value_set(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.stages.index import neighbors

    hits = neighbors(args.catalog, args.dataset, args.model, args.sample_id, args.k)
    text = snippets(args.catalog, args.dataset, [sid for sid, _ in hits], args.width)
    print(f"{'rank':>4}  {'score':>7}  {'sample_id':<32}  text")
    for rank, (sid, score) in enumerate(hits):
        print(f"{rank:>4}  {score:>7.4f}  {sid:<32}  {text.get(sid, '(not in samples)')}")
    return 0
