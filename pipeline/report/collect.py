"""What a curation report shows, read from the catalog (DuckDB views, embeddings, selection reports).

Everything is keyed by one dataset and, optionally, one selection (a ``selections/<name>/``
table, or a curated set of that name): "before" is the dataset's samples, "after" the selected
ones. Each part is optional — a dataset without quality scores simply has no quality plot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.catalog import Catalog
from pipeline.query import connect

MAP_POINTS = 5_000  # points on the 2-D embedding map (a deterministic sample beyond that; SVG, no WebGL)
TOP_LABELS = 25  # tags / concepts shown in the distribution plot
GROUPS_SHOWN = 8  # near-duplicate groups shown
MEMBERS_SHOWN = 24  # members shown per group
IID_DRAWS = 5  # IID batches per CABS step for the batch comparison


@dataclass
class ReportData:
    catalog: str
    dataset: str
    kind: str  # "instruction" | "image_text"
    selection: str | None
    n_samples: int
    selected: set[str] = field(default_factory=set)
    accounting: dict[str, int] = field(default_factory=dict)  # rows_in, samples, rejects, duplicates
    reject_reasons: list[tuple[str, int]] = field(default_factory=list)
    lengths: dict[str, float] = field(default_factory=dict)  # sample_id -> characters (or pixels)
    length_label: str = "characters"
    quality: dict[str, float] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)  # sample_id -> tags or concepts
    label_kind: str = "tags"
    gain_curve: list[float] = field(default_factory=list)  # MIG: gain of the pick at each rank
    selection_report: dict[str, Any] = field(default_factory=dict)  # the selector's report JSON
    cabs_steps: list[dict[str, float]] = field(default_factory=list)  # per step: CABS vs IID
    groups: list[dict[str, Any]] = field(default_factory=list)  # near-duplicate groups, largest first
    embedding_model: str | None = None
    map_ids: list[str] = field(default_factory=list)
    map_xy: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.float32))


def _rows(con, sql: str, params: list | None = None) -> list[tuple]:
    return con.execute(sql, params or []).fetchall()


def collect(catalog: str | Path, dataset: str, selection: str | None = None) -> ReportData:
    con = connect(catalog)  # first: it refuses a catalog that does not exist (Catalog.at would create it)
    cat = Catalog.at(catalog)
    n_text = _rows(con, "SELECT count(*) FROM samples WHERE dataset = ?", [dataset])[0][0]
    n_image = _rows(con, "SELECT count(*) FROM image_samples WHERE dataset = ?", [dataset])[0][0]
    if not n_text and not n_image:
        known = sorted({r[0] for r in _rows(con, "SELECT DISTINCT dataset FROM samples UNION "
                                                 "SELECT DISTINCT dataset FROM image_samples")})
        raise ValueError(f"dataset {dataset!r} has no samples in {cat.root}; datasets there: {', '.join(known) or 'none'}")
    kind = "instruction" if n_text else "image_text"
    data = ReportData(str(cat.root), dataset, kind, selection, int(n_text or n_image))
    _accounting(con, data)
    if kind == "instruction":
        data.lengths = dict(_rows(con, "SELECT sample_id, n_chars FROM samples WHERE dataset = ?", [dataset]))
        data.quality = {s: float(q) for s, q in _rows(
            con, "SELECT sample_id, score FROM quality WHERE dataset = ? AND score IS NOT NULL", [dataset])}
        data.labels = _labels(con, "SELECT sample_id, [t.tag FOR t IN tags] FROM tags "
                                   "WHERE dataset = ? AND annotator = (SELECT min(annotator) FROM tags WHERE dataset = ?)",
                              [dataset, dataset])
    else:
        data.length_label, data.label_kind = "caption characters", "concepts"
        data.lengths = dict(_rows(con, "SELECT sample_id, length(caption) FROM image_samples WHERE dataset = ?", [dataset]))
        data.labels = _labels(con, "SELECT sample_id, list_distinct([c.concept FOR c IN concepts]) FROM concepts "
                                   "WHERE dataset = ? AND annotator = (SELECT min(annotator) FROM concepts WHERE dataset = ?)",
                              [dataset, dataset])
    if selection:
        _selection(con, cat, data, selection)
    _groups(con, data)
    _embedding_map(cat, data)
    return data


def _labels(con, sql: str, params: list) -> dict[str, list[str]]:
    return {s: list(v or []) for s, v in _rows(con, sql, params)}


def _accounting(con, data: ReportData) -> None:
    data.reject_reasons = [(r, int(n)) for r, n in _rows(
        con, "SELECT reason, count(*) AS n FROM rejects WHERE dataset = ? GROUP BY reason ORDER BY n DESC, reason",
        [data.dataset])]
    dups = _rows(con, "SELECT count(*) FROM duplicates WHERE dataset = ?", [data.dataset])[0][0]
    rejects = sum(n for _, n in data.reject_reasons)
    data.accounting = {"rows_in": data.n_samples + rejects + int(dups), "samples": data.n_samples,
                       "rejects": rejects, "duplicates": int(dups)}


def _selection(con, cat: Catalog, data: ReportData, name: str) -> None:
    picks = _pick_table(cat, name)
    data.selected = set(picks["sample_id"])
    gains = picks.get("gain")
    if gains is not None and "step" not in picks and all(g is not None for g in gains):
        data.gain_curve = [float(g) for g in gains]
    data.selection_report = _selection_report(cat, name)
    if "step" in picks and data.labels:
        data.cabs_steps = _cabs_steps(list(zip(picks["step"], picks["sample_id"])), data.labels)


def _pick_table(cat: Catalog, name: str) -> dict[str, list]:
    """A selection's picks as columns, in pick order, from wherever the selector wrote them:
    ``selections/<name>/``, ``selections/<name>.picks|plan.parquet`` or ``curated/<name>/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = cat.root / "selections"
    for files in (sorted((base / name).glob("*.parquet")), sorted(base.glob(f"{name}.*.parquet")),
                  sorted(cat.curated_dir(name).glob("*.parquet"))):
        if files:
            table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
            order = [k for k in ("step", "rank", "position") if k in table.column_names]
            if order:
                table = table.sort_by([(k, "ascending") for k in order])
            return {c: table.column(c).to_pylist() for c in table.column_names}
    known = sorted({p.name.split(".")[0] for p in base.glob("*")} | {p.name for p in (cat.root / "curated").glob("*")})
    raise ValueError(f"no selection or curated set named {name!r} in {cat.root}; there are: {', '.join(known) or 'none'}")


def _selection_report(cat: Catalog, name: str) -> dict[str, Any]:
    """The selector's report: ``selections/<name>/report.json`` or the older ``<name>.*.report.json``."""
    base = cat.root / "selections"
    for path in [base / name / "report.json", *sorted(base.glob(f"{name}.*report.json"))]:
        if path.is_file():
            raw = json.loads(path.read_text())
            return raw.get("report", raw)
    return {}


def _cabs_steps(plan: list[tuple], labels: dict[str, list[str]]) -> list[dict[str, float]]:
    """Distinct concepts and concept entropy of each planned CABS batch vs IID batches of its size."""
    from pipeline.select.batch_metrics import batch_report
    from pipeline.select.cabs_schedule import as_concept_table

    ids = sorted(labels)
    position = {s: i for i, s in enumerate(ids)}
    table = as_concept_table([labels[s] for s in ids])
    steps: dict[int, list[int]] = {}
    for step, sample_id in plan:
        if sample_id in position:
            steps.setdefault(int(step), []).append(position[sample_id])
    rng = np.random.default_rng(0)
    out = []
    for step, rows in sorted(steps.items()):
        cabs = batch_report(table, np.asarray(rows))
        iid = [batch_report(table, rng.choice(len(ids), len(rows), replace=False)) for _ in range(IID_DRAWS)]
        out.append({"step": step, "cabs_distinct": cabs.distinct_concepts, "cabs_entropy": cabs.entropy_bits,
                    "iid_distinct": float(np.mean([r.distinct_concepts for r in iid])),
                    "iid_distinct_std": float(np.std([r.distinct_concepts for r in iid])),
                    "iid_entropy": float(np.mean([r.entropy_bits for r in iid]))})
    return out


def _groups(con, data: ReportData) -> None:
    rows = _rows(con, "SELECT group_id, list(sample_id ORDER BY NOT keep, sample_id), count(*) AS n, max(max_similarity) "
                      "FROM near_duplicates WHERE dataset = ? GROUP BY group_id HAVING n > 1 "
                      "ORDER BY n DESC, group_id LIMIT ?", [data.dataset, GROUPS_SHOWN])
    if not rows:
        return
    members = sorted({s for _, ids, _, _ in rows for s in ids[:MEMBERS_SHOWN]})
    if data.kind == "instruction":
        preview = dict(_rows(con, "SELECT sample_id, left(messages[1].content, 160) FROM samples "
                                  "WHERE dataset = ? AND list_contains(?, sample_id)", [data.dataset, members]))
    else:
        preview = {s: _thumbnail(img) for s, img in _rows(
            con, "SELECT sample_id, image FROM image_samples WHERE dataset = ? AND list_contains(?, sample_id)",
            [data.dataset, members])}
    data.groups = [{"group": g, "size": int(n), "max_similarity": float(sim or 0.0),
                    "members": [(s, preview.get(s, "")) for s in ids]} for g, ids, n, sim in rows]


def _thumbnail(image: bytes, size: int = 96) -> str:
    """A small JPEG data URI, so the page needs no file beside it."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _embedding_map(cat: Catalog, data: ReportData) -> None:
    """The dataset's embeddings projected on their first two principal components."""
    import pyarrow.parquet as pq

    from pipeline.index.faiss_index import arrow_to_vectors

    root = cat.root / "embeddings"
    candidates = sorted(p for p in root.glob(f"*/dataset={data.dataset}") if any(p.glob("*.parquet")))
    if data.kind == "image_text":  # the image tower's vectors describe the pictures
        candidates.sort(key=lambda p: not p.parent.name.endswith("-image"))
    if not candidates:
        return
    folder = candidates[0]
    ids, parts = [], []
    for shard in sorted(folder.glob("*.parquet")):
        table = pq.read_table(shard, columns=["sample_id", "embedding"])
        ids.extend(table.column("sample_id").to_pylist())
        parts.append(arrow_to_vectors(table.column("embedding"), what=str(shard)))
    vectors = np.concatenate(parts).astype(np.float64)
    keep = np.isfinite(vectors).all(axis=1)
    order = np.flatnonzero(keep)
    if order.size > MAP_POINTS:  # deterministic sample, selected points always shown
        chosen = np.array([ids[i] in data.selected for i in order])
        rng = np.random.default_rng(0)
        rest = rng.choice(np.flatnonzero(~chosen), max(MAP_POINTS - int(chosen.sum()), 0), replace=False)
        order = np.sort(np.concatenate([order[chosen], order[rest]]))
    if order.size < 3:
        return
    x = vectors[order] - vectors[order].mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    xy *= np.sign(xy[np.abs(xy).argmax(axis=0), [0, 1]])  # fix the SVD's arbitrary signs
    data.embedding_model = folder.parent.name
    data.map_ids = [ids[i] for i in order]
    data.map_xy = xy.astype(np.float32)
