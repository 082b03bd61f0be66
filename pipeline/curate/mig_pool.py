"""MIG over real pools: an xsample JSONL file or a catalog dataset with tag and quality annotations.

The algorithm lives in ``pipeline.select.mig`` (pure, exact, fast); this module only gathers its
inputs (labels, scores, label graph), runs it, and writes the picks with a report: the dataset
information E(D) of the selection against random selections of the same size, and tag coverage.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.curate import annotations
from pipeline.embed.sentence import DEFAULT_TEXT_MODEL_NAME
from pipeline.io.catalog import Catalog
from pipeline.select import label_graph as lg
from pipeline.select import mig


@dataclass
class Pool:
    sample_ids: list[str]
    labels: list[list[str]]
    scores: np.ndarray
    index: np.ndarray  # what OUT's `index` column reports (line number or row position)
    source: str
    notes: dict[str, Any] = field(default_factory=dict)
    catalog: Path | None = None  # the catalog a pool was drawn from (its label-vector cache)


def pool_from_xsample(path: str | Path) -> Pool:
    """The MIG/xsample layout; ids are the same content hashes ingest gives these conversations."""
    from pipeline.io.instruction_formats import normalise
    from pipeline.io.sample_id import conversation_id

    xs = mig.read_xsample_jsonl(path)
    wanted = set(int(i) for i in xs.line_numbers)
    ids: dict[int, str] = {}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        record_no = -1
        for line in fh:
            if not line.strip():
                continue
            record_no += 1
            if record_no in wanted:
                ids[record_no] = conversation_id(normalise(json.loads(line), "xsample").messages)
    return Pool([ids[int(i)] for i in xs.line_numbers], xs.labels, xs.scores, xs.line_numbers,
                str(path), {"skipped_without_annotations": xs.skipped})


def answerless_ids(samples: Path) -> set[str]:
    """Sample ids whose conversation has no user turn answered by the assistant (the rule of
    ``materialise.has_answer``: some user message comes before some assistant message).

    Such samples never reach an SFT export, so a pool that kept them would spend budget on rows
    that are dropped later. Vectorised over the flattened messages: one pass, no Python per row.
    """
    table = pq.read_table(samples, columns=["sample_id", "messages"])
    messages = table.column("messages").combine_chunks()
    parents = pc.list_parent_indices(messages).to_numpy()
    roles = pc.struct_field(pc.list_flatten(messages), "role").to_numpy(zero_copy_only=False)
    pos = np.arange(len(roles))
    first_user = np.full(table.num_rows, np.iinfo(np.int64).max, dtype=np.int64)
    last_assistant = np.full(table.num_rows, -1, dtype=np.int64)
    user, assistant = roles == "user", roles == "assistant"
    np.minimum.at(first_user, parents[user], pos[user])
    np.maximum.at(last_assistant, parents[assistant], pos[assistant])
    ids = table.column("sample_id").to_pylist()
    return {ids[i] for i in np.flatnonzero(first_user >= last_assistant)}


NEAR_DUP_PREFIX = "near_dup_"  # pipeline.stages.index.near_dup_annotator(model) names them so
NEAR_DUP_THRESHOLD = 0.95  # the curate_instructions flow's default cosine


def near_dup_annotations(catalog: str | Path | Catalog, dataset: str) -> list[str]:
    """The near-duplicate annotators (``near_dup_<model>``) that have rows for ``dataset``."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    root = cat.root / "annotations"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob(NEAR_DUP_PREFIX + "*")
                  if p.is_dir() and annotations.find(cat, dataset, (p.name,)) is not None)


def _how_to_mark(cat: Catalog, dataset: str) -> str:
    emb = cat.root / "embeddings"
    models = sorted(p.name for p in emb.glob("*") if (p / f"dataset={dataset}").is_dir()) if emb.is_dir() else []
    index = (f"thresher index --catalog {cat.root} --dataset {dataset} --model {models[0] if models else DEFAULT_TEXT_MODEL_NAME} "
             f"--near-dup {NEAR_DUP_THRESHOLD}")
    if models:
        return f"`{index}`"
    return f"`thresher embed --catalog {cat.root} --dataset {dataset}`, then `{index}`"


def resolve_near_duplicates(catalog: str | Path | Catalog, dataset: str,
                            near_duplicates: str | None = "auto") -> tuple[str | None, str | None]:
    """(the near-duplicate annotator to exclude near-copies with, or None; a note when there is none).

    ``near_duplicates``: None keeps every sample; an annotator name (``near_dup_<model>``) or a
    model name must exist; ``"auto"`` takes the dataset's near-duplicate annotation when it has
    exactly one (or, among several, the default text model's), and otherwise returns None with a
    one-line note saying so and how to make one.
    """
    if near_duplicates is None:
        return None, None
    cat = catalog if isinstance(catalog, Catalog) else Catalog.at(catalog)
    if near_duplicates != "auto":
        name = near_duplicates if near_duplicates.startswith(NEAR_DUP_PREFIX) else NEAR_DUP_PREFIX + near_duplicates
        if annotations.find(cat, dataset, (name,)) is None:
            have = near_dup_annotations(cat, dataset)
            raise FileNotFoundError(f"dataset {dataset!r} has no {name} annotation (near-duplicate annotations "
                                    f"here: {', '.join(have) or 'none'}); make one with {_how_to_mark(cat, dataset)}")
        return name, None
    have = near_dup_annotations(cat, dataset)
    if len(have) == 1:
        return have[0], None
    if not have:
        return None, (f"note: dataset {dataset!r} has no near-duplicate annotation, so near-copies can be picked; "
                      f"make one with {_how_to_mark(cat, dataset)}")
    default = NEAR_DUP_PREFIX + DEFAULT_TEXT_MODEL_NAME
    if default in have:
        return default, None
    raise ValueError(f"dataset {dataset!r} has several near-duplicate annotations ({', '.join(have)}); "
                     "choose one with --near-dups NAME")


def catalog_sources(cat: Catalog, dataset: str, tags: str = "auto", quality: str = "auto",
                    near_duplicates: str | None = None) -> list[Path]:
    """The folders :func:`pool_from_catalog` would read, resolved as it resolves them, reading no rows
    (so an unchanged selection is skipped before any pool is built)."""
    samples = cat.samples_partition("instruction", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no instruction samples for dataset {dataset!r} in {cat.root}")
    hint = "run `thresher annotate` first (or pass an xsample JSONL file)"
    near_from, _ = resolve_near_duplicates(cat, dataset, near_duplicates)
    return [samples, annotations.require(cat, dataset, tags, annotations.TAG_SOURCES, hint),
            annotations.require(cat, dataset, quality, annotations.QUALITY_SOURCES, hint),
            *([cat.annotation_partition(near_from, dataset)] if near_from else [])]


def pool_from_catalog(catalog: str | Path, dataset: str, tags: str = "auto", quality: str = "auto",
                      near_duplicates: str | None = None) -> Pool:
    """Samples of ``dataset`` with labels from annotator ``tags`` and scores from ``quality``.

    ``auto`` prefers the annotations the input carried (``input_tags`` / ``input_quality``), then
    the offline annotators. Samples without tags get an empty label set; without a score, 0.
    With ``near_duplicates`` (an annotator such as ``near_dup_<model>``, or ``"auto"``: see
    :func:`resolve_near_duplicates`), samples that annotation marks as not kept leave the pool, so
    MIG never spends budget on a near-copy. Samples without an assistant answer
    (:func:`answerless_ids`) always leave the pool: no SFT export would keep them. The
    curate_instructions flow and ``thresher select mig`` both build their pools here; ``notes`` say
    what was excluded and from which annotation.
    """
    cat = Catalog.at(catalog)
    samples = cat.samples_partition("instruction", dataset)
    if not samples.is_dir():
        raise FileNotFoundError(f"no instruction samples for dataset {dataset!r} in {cat.root}")
    ids = sorted(pq.read_table(samples, columns=["sample_id"]).column("sample_id").to_pylist())
    answerless = answerless_ids(samples)
    ids = [s for s in ids if s not in answerless]
    near_from, near_note = resolve_near_duplicates(cat, dataset, near_duplicates)
    dropped = 0
    if near_from:
        removed = annotations.near_copies(cat, dataset, near_from)
        dropped = sum(1 for s in ids if s in removed)
        ids = [s for s in ids if s not in removed]
    hint = "run `thresher annotate` first (or pass an xsample JSONL file)"
    tag_part = annotations.require(cat, dataset, tags, annotations.TAG_SOURCES, hint)
    q_part = annotations.require(cat, dataset, quality, annotations.QUALITY_SOURCES, hint)
    tag_rows = pq.read_table(tag_part, columns=["sample_id", "tags"]).to_pylist()
    by_id_tags = {r["sample_id"]: [t["tag"] for t in r["tags"] or []] for r in tag_rows}
    q = pq.read_table(q_part, columns=["sample_id", "score"]).to_pylist()
    by_id_score = {r["sample_id"]: (r["score"] or 0.0) for r in q}
    labels = [list(dict.fromkeys(by_id_tags.get(s, []))) for s in ids]
    scores = np.array([float(by_id_score.get(s, 0.0)) for s in ids], dtype=np.float64)
    notes = {"tags_from": tag_part.parent.name, "quality_from": q_part.parent.name,
             "without_tags": sum(1 for s in ids if s not in by_id_tags),
             "without_score": sum(1 for s in ids if s not in by_id_score),
             "near_duplicates_excluded": dropped, "near_duplicates_from": near_from,
             "without_assistant_answer_excluded": len(answerless)}
    if near_note:
        notes["near_duplicates_note"] = near_note
    return Pool(ids, labels, scores, np.arange(len(ids)), f"{cat.root}#{dataset}", notes, cat.root)


@dataclass
class MIGReport:
    n_pool: int
    budget: int
    n_labels: int
    graph: str
    information: float
    random_information_mean: float
    random_information_std: float
    coverage_pool: int
    coverage_selected: int
    coverage_random_mean: float
    seconds: dict[str, float]
    notes: dict[str, Any]

    def lines(self) -> list[str]:
        ratio = self.information / self.random_information_mean if self.random_information_mean else float("nan")
        return [
            f"pool {self.n_pool:,} samples, {self.n_labels:,} labels, budget {self.budget:,}",
            f"label graph: {self.graph}",
            f"E(D) MIG selection   {self.information:,.3f}",
            f"E(D) random (mean)   {self.random_information_mean:,.3f} ± {self.random_information_std:,.3f}"
            f"   (MIG / random = {ratio:.3f})",
            f"tag coverage: pool {self.coverage_pool:,}, MIG {self.coverage_selected:,}, "
            f"random {self.coverage_random_mean:,.1f}",
            "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()),
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_graph(vocabulary: tuple[str, ...], config: mig.MIGConfig, edges: str | Path | None,
                embed: Callable[[list[str]], np.ndarray] | None = None,
                catalog: Path | None = None) -> lg.LabelGraph:
    """The label graph: from an edge list, else from label vectors (``embed``; by default the
    bundled MiniLM through a stored text-vector cache: ``catalog``'s, else the user cache, so a
    re-run loads no model)."""
    if edges is not None:
        return lg.label_graph_from_edge_parquet(vocabulary, edges)
    if embed is None:
        embed = lg.stored_label_embedder(catalog)
    return lg.label_graph_from_texts(vocabulary, embed, config.sim_threshold)


def select(pool: Pool, budget: int, config: mig.MIGConfig = mig.MIGConfig(), edges: str | Path | None = None,
           embed: Callable[[list[str]], np.ndarray] | None = None, random_trials: int = 5,
           seed: int = 0) -> tuple[pa.Table, MIGReport]:
    vocabulary = mig.pool_vocabulary(pool.labels)
    if not vocabulary:
        raise ValueError(f"no sample of {pool.source} has any label; MIG needs tags")
    graph = build_graph(vocabulary, config, edges, embed, pool.catalog)
    label_ids = mig.encode_labels(pool.labels, graph.labels).label_ids
    result = mig.mig_select(label_ids, pool.scores, graph.W, budget, config)
    picks = result.picks
    table = pa.table({
        "rank": np.arange(len(picks), dtype=np.int64),
        "index": pool.index[picks].astype(np.int64),
        "sample_id": [pool.sample_ids[i] for i in picks],
        "gain": result.gains.astype(np.float64),
        "labels": [pool.labels[i] for i in picks],
    }, schema=schemas.MIG_PICKS)
    rand = mig.random_baseline(result.ehat, len(picks), config, n_trials=random_trials, seed=seed) \
        if len(picks) else np.zeros(1)
    rng = np.random.default_rng(seed)
    rand_cov = [mig.tag_coverage(label_ids, rng.choice(len(label_ids), len(picks), replace=False)).covered
                for _ in range(random_trials)]
    cov = mig.tag_coverage(label_ids, picks)
    report = MIGReport(
        n_pool=len(pool.sample_ids), budget=len(picks), n_labels=graph.n_labels,
        graph=graph.degree_stats().as_row() if edges is None else f"edge list {edges}",
        information=result.information, random_information_mean=float(rand.mean()),
        random_information_std=float(rand.std()), coverage_pool=cov.total, coverage_selected=cov.covered,
        coverage_random_mean=float(np.mean(rand_cov)), seconds=result.seconds, notes=pool.notes)
    return table, report


def pool_notes(pool: Pool) -> list[str]:
    """What the pool left out (answerless conversations, near-copies), or why it could not, as lines."""
    lines = []
    if pool.notes.get("without_assistant_answer_excluded"):
        lines.append(f"without an assistant answer: excluded {pool.notes['without_assistant_answer_excluded']:,} "
                     "samples (no SFT export keeps them)")
    if pool.notes.get("near_duplicates_from"):
        return lines + [f"near-duplicates: excluded {pool.notes['near_duplicates_excluded']:,} samples that "
                        f"{pool.notes['near_duplicates_from']} marks as near-copies (--keep-near-duplicates keeps them)"]
    if pool.notes.get("near_duplicates_note"):
        return lines + [pool.notes["near_duplicates_note"]]
    return lines


class MIGSelector:
    """MIG behind the selector protocol (``pipeline.select.protocol``); parameters: the registry's."""

    name = "mig"
    schema = schemas.MIG_PICKS

    def from_catalog(self, cat: Catalog, dataset: str, params: dict[str, Any]) -> Pool:
        near = None if params["keep_near_duplicates"] else params["near_dups"]
        return pool_from_catalog(cat.root, dataset, params["tags"], params["quality"], near_duplicates=near)

    def from_file(self, path: Path, params: dict[str, Any]) -> Pool:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file (MIG reads an xsample-layout JSONL(.gz) file)")
        return pool_from_xsample(path)

    def sources(self, cat: Catalog, dataset: str | None, path: Path | None, params: dict[str, Any]) -> list[Path]:
        graph = [Path(params["label_graph"])] if params["label_graph"] else []
        if dataset is None:
            return [path, *graph]  # type: ignore[list-item]
        near = None if params["keep_near_duplicates"] else params["near_dups"]
        return [*catalog_sources(cat, dataset, params["tags"], params["quality"], near), *graph]

    def notes(self, pool: Pool, params: dict[str, Any]) -> list[str]:
        if params["keep_near_duplicates"] and pool.catalog is not None:
            return [*pool_notes(pool), "near-duplicates: kept (--keep-near-duplicates)"]
        return pool_notes(pool)

    def run(self, pool: Pool, params: dict[str, Any]) -> tuple[pa.Table, MIGReport]:
        config = mig.MIGConfig(sim_threshold=params["sim_threshold"] or mig.MINILM_DEFAULT_THRESHOLD,
                               prop_weight=params["prop_weight"], phi=params["phi"], phi_b=params["phi_b"],
                               phi_a=params["phi_a"], phi_alpha=params["phi_alpha"], norm=params["norm"])
        budget = min(params["budget"], len(pool.sample_ids)) if params["fit_budget"] else params["budget"]
        return select(pool, budget, config, edges=params["label_graph"], random_trials=params["random_trials"])


def write_selection(table: pa.Table, report: MIGReport, out: str | Path, parameters: dict[str, Any]) -> Path:
    """MIG picks to a file outside any catalog (benchmarks); through the selection protocol's writer."""
    from pipeline.select.protocol import write_files

    out = Path(out)
    write_files(table, schemas.MIG_PICKS, {"selector": "mig", "parameters": parameters, "report": report.to_dict(),
                                           "lines": report.lines()}, out, out.with_suffix(".report.json"))
    return out
