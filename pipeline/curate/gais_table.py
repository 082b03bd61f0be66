"""GAIS over tables: features and labels from a Parquet file or a catalog dataset's embeddings.

The algorithm (``pipeline.select.gais``) takes a scaled feature matrix and labels; this module
gathers them — numeric or list<float> columns of any Parquet table, or the embeddings of a
catalog dataset with any label column of its samples (source, format, first tag) — and writes one
row per instance: ``index``, ``sample_id``, ``label``, ``score``, ``selected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.curate import annotations
from pipeline.io.catalog import Catalog


@dataclass
class Instances:
    X: np.ndarray
    labels: list[str]
    sample_ids: list[str]
    source: str


def _matrix(table: pa.Table, features: str | None, exclude: set[str]) -> np.ndarray:
    """One vector column (list<float>), named numeric columns "a,b,c", or every numeric column."""
    if features and features in table.column_names:
        t = table.schema.field(features).type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return np.asarray(table.column(features).to_pylist(), dtype=np.float32)
    names = ([c.strip() for c in features.split(",")] if features else
             [f.name for f in table.schema if f.name not in exclude
              and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))])
    missing = [n for n in names if n not in table.column_names]
    if missing or not names:
        raise ValueError(f"feature columns {missing or names} not found among {table.column_names}")
    return np.column_stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names])


def instances_from_table(path: str | Path, label_column: str, features: str | None = None,
                         id_column: str = "sample_id") -> Instances:
    table = pq.read_table(path)
    if label_column not in table.column_names:
        raise ValueError(f"{path} has no label column {label_column!r}; columns: {table.column_names}")
    X = _matrix(table, features, {label_column, id_column})
    ids = ([str(v) for v in table.column(id_column).to_pylist()] if id_column in table.column_names
           else [str(i) for i in range(table.num_rows)])
    return Instances(X, [str(v) for v in table.column(label_column).to_pylist()], ids, str(path))


def instances_from_catalog(catalog: str | Path, dataset: str, label_column: str, model: str,
                           kind: str = "instruction") -> Instances:
    """Embeddings of ``dataset`` (model folder ``model``) labelled by a samples column or ``tag``."""
    cat = Catalog.at(catalog)
    emb = cat.embedding_partition(model, dataset)
    if not emb.is_dir():
        raise FileNotFoundError(f"no embeddings {model!r} for dataset {dataset!r}; run `thresher embed` first")
    vectors = pq.read_table(emb).sort_by("sample_id")
    ids = vectors.column("sample_id").to_pylist()
    if label_column == "tag":
        part = annotations.require(cat, dataset, "auto", annotations.TAG_SOURCES,
                                   "run `thresher annotate tags` first for --label-column tag")
        rows = pq.read_table(part, columns=["sample_id", "tags"]).to_pylist()
        by_id = {r["sample_id"]: (r["tags"][0]["tag"] if r["tags"] else "untagged") for r in rows}
    else:
        samples = pq.read_table(cat.samples_partition(kind, dataset))
        if label_column not in samples.column_names:
            raise ValueError(f"samples have no column {label_column!r}; use one of {samples.column_names} or 'tag'")
        by_id = dict(zip(samples.column("sample_id").to_pylist(), map(str, samples.column(label_column).to_pylist())))
    X = np.asarray(vectors.column("embedding").to_pylist(), dtype=np.float32)
    return Instances(X, [by_id.get(s, "unknown") for s in ids], ids, f"{cat.root}#{dataset}:{model}")


@dataclass
class GAISReport:
    """What a GAIS run kept, per class, and how long each phase took."""

    data: dict[str, Any]

    def lines(self) -> list[str]:
        d = self.data
        out = [f"GAIS-{d['variant']} ({d['scoring']}): kept {d['selected']:,} of {d['n']:,} "
               f"(reduction {d['achieved_reduction']:.3f}) in {d['timings'].get('total_s', 0):.1f} s"]
        out += [f"  class {k}: {v:,} kept" for k, v in list(d["per_class_counts"].items())[:20]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.data


class GAISSelector:
    """GAIS behind the selector protocol (``pipeline.select.protocol``); one row per instance."""

    name = "gais"
    schema = schemas.GAIS_SELECTION

    def from_catalog(self, cat: Catalog, dataset: str, params: dict[str, Any]) -> Instances:
        if not params["embeddings"]:
            raise ValueError("GAIS over a catalog dataset needs embeddings=MODEL (--embeddings: the features)")
        return instances_from_catalog(cat.root, dataset, params["label_column"], params["embeddings"],
                                      params["sample_kind"])

    def from_file(self, path: Path, params: dict[str, Any]) -> Instances:
        return instances_from_table(path, params["label_column"], params["features"])

    def sources(self, cat: Catalog, dataset: str | None, path: Path | None, params: dict[str, Any]) -> list[Path]:
        if dataset is None:
            return [path]  # type: ignore[list-item]
        if not params["embeddings"]:
            raise ValueError("GAIS over a catalog dataset needs embeddings=MODEL (--embeddings: the features)")
        emb = cat.embedding_partition(params["embeddings"], dataset)
        if not emb.is_dir():
            raise FileNotFoundError(f"no embeddings {params['embeddings']!r} for dataset {dataset!r}; "
                                    "run `thresher embed` first")
        if params["label_column"] == "tag":
            return [emb, annotations.require(cat, dataset, "auto", annotations.TAG_SOURCES,
                                             "run `thresher annotate tags` first for --label-column tag")]
        return [emb, cat.samples_partition(params["sample_kind"], dataset)]

    def notes(self, pool: Instances, params: dict[str, Any]) -> list[str]:
        return []

    def run(self, pool: Instances, params: dict[str, Any]) -> tuple[pa.Table, GAISReport]:
        table, report = run(pool, params["variant"], params["reduction"], params["scoring"], params["seed"],
                            scale=params["scale"])
        return table, GAISReport(report)


def run(inst: Instances, variant: str, reduction: float, scoring: str = "same_class", seed: int = 0,
        scale: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    from pipeline.select.gais import gais_select

    X = inst.X
    if scale:  # GAIS expects comparable feature scales; standardise over the input
        X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    res = gais_select(X, np.asarray(inst.labels), variant=variant, reduction=reduction, scoring=scoring, seed=seed)
    table = pa.table({"index": np.arange(len(inst.labels), dtype=np.int64), "sample_id": inst.sample_ids,
                      "label": inst.labels, "score": res.scores.astype(np.float64),
                      "selected": res.selected_mask.astype(bool)}, schema=schemas.GAIS_SELECTION)
    report = {"source": inst.source, "n": len(inst.labels), "selected": int(res.selected_mask.sum()),
              "achieved_reduction": res.achieved_reduction, "variant": variant, "scoring": scoring,
              "per_class_counts": {str(k): int(v) for k, v in res.per_class_counts.items()},
              "timings": res.timings, "graph_stats": res.graph_stats,
              "gat_train_accuracy": res.gat_train_accuracy}
    return table, report




def write(table: pa.Table, report: dict[str, Any], out: str | Path, parameters: dict[str, Any]) -> Path:
    """GAIS rows to a file outside any catalog; through the selection protocol's writer."""
    from pipeline.select.protocol import write_files

    out = Path(out)
    write_files(table, schemas.GAIS_SELECTION, {"selector": "gais", "parameters": parameters, "report": report,
                                                "lines": GAISReport(report).lines()}, out, out.with_suffix(".report.json"))
    return out
