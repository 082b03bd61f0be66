"""Every pluggable step, registered by name in one place per family.

Four registries: :data:`ANNOTATORS`, :data:`EMBEDDERS`, :data:`SELECTORS`, :data:`EXPORTERS`.
The CLI's choices, the flows' step dispatch and pipeline-spec validation all read them, so adding
an annotator, embedder, selector or exporter is one entry here plus its implementation.

Looking entries up::

    from pipeline import registry

    entry = registry.SELECTORS["mig"]          # KeyError naming every choice when unknown
    entry.kind                                 # "instruction" or "image_text"
    entry.help                                 # one line
    entry.params                               # tuple of Param(name, type, default, help, choices)
    entry.param("budget").required             # True
    entry.validate({"budget": 100})            # defaults filled in; ValueError on unknown names,
                                               # wrong types, bad choices, missing required ones
    fn = entry.load()                          # imports the implementation only now
    registry.SELECTORS.names()                 # ("mig", "cabs", "gais"); names(kind="image_text")
    registry.ANNOTATORS.options("tags")        # ("offline", "llm"): the CLI's --annotator values
    registry.ANNOTATORS.find("tags", "llm")    # the llm_tags entry

This module imports nothing heavy (no numpy, Beam, Prefect or torch): implementations are named
as ``"module:attribute"`` strings and imported by :meth:`Entry.load`, so ``thresher --help``
stays fast. Choice lists kept elsewhere (the text-embedding tiers) are named the same way.

How each family's callable is called (``params`` = ``entry.validate(...)``):

- annotators and embedders: ``fn(catalog, dataset, workers=1, force=False, beam_args=None,
  **params)`` -> the stage's result dataclass (Beam stages under ``pipeline.io.runs.StageRun``);
- selectors: a class following :class:`pipeline.select.protocol.Selector`; run one with
  :func:`pipeline.select.protocol.select_into_catalog` (writes ``selections/<name>/`` under
  StageRun) or :func:`pipeline.select.protocol.run_selector`;
- exporters: ``fn(catalog, source, out_dir, overwrite=False, **params)`` -> the export manifest
  (``source``: the curated set for instruction formats, the selection (batch plan) for
  ``webdataset``, which also needs ``dataset=``); ledger entry under StageRun.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("instruction", "image_text")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Param:
    """One parameter of a registered step.

    ``type`` is one of ``str``, ``int``, ``float``, ``bool``; ``default`` None means "optional,
    unset" (None is then accepted as a value); ``choices`` is a tuple, or a ``"module:attr"``
    string naming one (resolved only when asked for).
    """

    name: str
    type: type
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[Any, ...] | str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def choice_values(self) -> tuple[Any, ...] | None:
        if isinstance(self.choices, str):
            return tuple(_resolve(self.choices))
        return self.choices

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this parameter's type (int -> float only), or ValueError."""
        if value is None and self.default is None:
            return None
        t = self.type
        ok = (isinstance(value, bool) if t is bool else
              isinstance(value, int) and not isinstance(value, bool) if t is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
              isinstance(value, t))
        if not ok:
            raise ValueError(f"{where}: parameter {self.name!r} must be {t.__name__}, got {value!r}")
        if t is float:
            value = float(value)
        choices = self.choice_values()
        if choices is not None and value not in choices:
            raise ValueError(f"{where}: parameter {self.name!r} is {value!r}; choose from: "
                             f"{', '.join(map(str, choices))}")
        return value


@dataclass(frozen=True)
class Entry:
    """One registered step: its name, data kind, one-line help, implementation and parameters.

    ``group`` and ``option`` serve families with sub-kinds: an annotator's group is what it
    produces (``tags``, ``quality``, ``concepts``) and its option the short name the CLI takes
    (``--annotator offline``); an exporter's group is what it reads (``curated`` or ``plan``).
    """

    family: str
    name: str
    kind: str
    help: str
    target: str  # "module:attribute", imported by load()
    params: tuple[Param, ...] = ()
    group: str = ""
    option: str = ""

    def load(self) -> Any:
        return _resolve(self.target)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(_unknown(f"parameter of {self.family} {self.name!r}", name, [p.name for p in self.params]))

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` checked against this entry, with defaults filled in (a new dict)."""
        params = dict(params or {})
        where = f"{self.family} {self.name!r}"
        names = [p.name for p in self.params]
        for key in params:
            if key not in names:
                raise ValueError(_unknown(f"parameter of {where}", key, names))
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in params:
                out[p.name] = p.check(params[p.name], where)
            elif p.required:
                raise ValueError(f"{where}: parameter {p.name!r} is required ({p.help or p.type.__name__})")
            else:
                out[p.name] = p.default
        return out


def _unknown(what: str, name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; choose from: {', '.join(choices) or 'none'}"


@dataclass(frozen=True)
class Registry(Mapping[str, Entry]):
    """Entries of one family by name; an unknown name raises KeyError listing the choices."""

    family: str
    entries: tuple[Entry, ...]
    _by_name: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Entry] = {}
        for e in self.entries:
            if e.name in by_name:
                raise ValueError(f"{self.family} {e.name!r} is registered twice")
            if e.kind not in KINDS:
                raise ValueError(f"{self.family} {e.name!r}: kind {e.kind!r} is not one of {KINDS}")
            by_name[e.name] = e
        object.__setattr__(self, "_by_name", by_name)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(_unknown(self.family, name, list(self._by_name))) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self, kind: str | None = None, group: str | None = None) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries
                     if (kind is None or e.kind == kind) and (group is None or e.group == group))

    def options(self, group: str) -> tuple[str, ...]:
        """The short names (``option``) of a group's entries, e.g. the CLI's ``--annotator`` values."""
        return tuple(e.option for e in self.entries if e.group == group)

    def find(self, group: str, option: str) -> Entry:
        for e in self.entries:
            if e.group == group and e.option == option:
                return e
        raise KeyError(_unknown(f"{group} {self.family}", option, list(self.options(group))))


TIERS = "pipeline.embed.tiers:TIERS"  # text-embedding tiers, kept beside their builders
PRECISIONS = "pipeline.embed.sentence:PRECISIONS"

# ------------------------------------------------------------------------------ annotators

_TIER = Param("tier", str, "fp32", "which stored text embeddings to read (made first when missing)", TIERS)
_OUT_NAME = Param("name", str, None, "output folder under annotations/ (default <option>_<group>)")
_LLM = (
    Param("endpoint", str, REQUIRED, "base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1"),
    Param("model", str, REQUIRED, "model name the endpoint serves"),
    Param("api_key_env", str, "THRESHER_LLM_API_KEY", "environment variable holding the API key"),
    Param("concurrency", int, 8, "requests in flight per worker"),
    Param("timeout", float, 60.0, "seconds per request"),
    Param("retries", int, 3, "retries after a timeout, connection error, 429 or 5xx"),
    Param("max_tokens", int, 512),
    Param("cache", str, None, "SQLite reply cache (default <catalog>/cache/llm_annotations.sqlite)"),
    _OUT_NAME,
)
_CONCEPT_VOCAB = Param("vocabulary", str, None, "concept vocabulary file (default: the shipped one)")

ANNOTATORS = Registry("annotator", (
    Entry("annotator", "offline_tags", "instruction",
          "InsTag-style intention tags from the stored user-side MiniLM vectors + rules",
          "pipeline.steps:offline_tags", (
              Param("vocabulary", str, None, "tag TSV (default: the shipped one)"),
              Param("top_k", int, None, "embedding proposals per sample"),
              Param("threshold", float, None, "cosine a proposal must reach"),
              _TIER, Param("device", str, None, "embedder device (default: cuda when available)"), _OUT_NAME),
          group="tags", option="offline"),
    Entry("annotator", "llm_tags", "instruction", "intention tags from an OpenAI-compatible LLM endpoint",
          "pipeline.steps:llm_tags", _LLM, group="tags", option="llm"),
    Entry("annotator", "offline_quality", "instruction",
          "DEITA-style quality x complexity from heuristics and the stored user/answer vectors",
          "pipeline.steps:offline_quality", (
              Param("use_embeddings", bool, True, "use the on-topic feature (needs the text embeddings)"),
              _TIER, _OUT_NAME),
          group="quality", option="offline"),
    Entry("annotator", "llm_quality", "instruction", "quality and complexity scores from an LLM endpoint",
          "pipeline.steps:llm_quality", _LLM, group="quality", option="llm"),
    Entry("annotator", "caption_concepts", "image_text", "MetaCLIP-style concept matching in captions",
          "pipeline.stages.concepts:run_caption_concepts", (_CONCEPT_VOCAB,),
          group="concepts", option="caption"),
    Entry("annotator", "clip_concepts", "image_text", "open_clip zero-shot concept tagging of the images",
          "pipeline.stages.concepts:run_clip_concepts", (
              Param("model_name", str, "ViT-B-32", "open_clip architecture"),
              Param("pretrained", str, None, "a cached pretrained tag or a checkpoint file; None: random weights"),
              Param("top_k", int, 10), Param("threshold", float, 0.01),
              _CONCEPT_VOCAB,
              Param("score", str, "softmax", choices=("softmax", "cosine")),
              Param("template", str, "a photo of a {}."),
              Param("batch_size", int, 64), Param("device", str, None), Param("seed", int, 0)),
          group="concepts", option="clip"),
))

# ------------------------------------------------------------------------------ embedders

EMBEDDERS = Registry("embedder", (
    Entry("embedder", "text", "instruction",
          "one MiniLM pass per conversation pooled into whole / user / answer vectors (fp32, int8 or static tier)",
          "pipeline.stages.embeddings:run_text_embedding", (
              Param("model", str, None, "sentence-transformers folder or cached name (default: bundled MiniLM)"),
              Param("tier", str, "fp32", "encoder tier (docs/embedding_tiers.md)", TIERS),
              Param("precision", str, "auto", "fp32 tier's compute precision: auto = fp16 on a GPU, bf16 on a "
                    "CPU with native bf16, else fp32", PRECISIONS),
              Param("batch_size", int, None), Param("max_chars", int, None),
              Param("device", str, None), Param("name", str, None, "embeddings folder name")),
          option="text"),
    Entry("embedder", "clip", "image_text", "open_clip image and caption vectors plus the CLIP score",
          "pipeline.stages.embeddings:run_clip_embedding", (
              Param("model_name", str, "ViT-B-32", "open_clip architecture"),
              Param("pretrained", str, None, "a cached pretrained tag or a checkpoint file; None: random weights"),
              Param("batch_size", int, 64), Param("seed", int, 0), Param("device", str, None),
              Param("name", str, None, "embeddings folder key")),
          option="clip"),
))

# ------------------------------------------------------------------------------ selectors

SELECTORS = Registry("selector", (
    Entry("selector", "mig", "instruction", "MIG information-gain selection over tagged, scored instructions",
          "pipeline.curate.mig_pool:MIGSelector", (
              Param("budget", int, REQUIRED, "number of samples to pick"),
              Param("fit_budget", bool, False, "pick the whole pool when it is smaller than the budget"),
              Param("label_graph", str, None, "Parquet edge list (label_a, label_b, similarity) replacing the "
                                              "embedding-built label graph"),
              Param("sim_threshold", float, None, "T for the embedding-built label graph (default: MiniLM's)"),
              Param("prop_weight", float, 1.0, "alpha: weight of neighbouring labels"),
              Param("phi", str, "pow", choices=("pow", "exp")),
              Param("phi_b", float, 0.8), Param("phi_a", float, 1e-6), Param("phi_alpha", float, 1.0),
              Param("norm", bool, False, "score / number of labels"),
              Param("tags", str, "auto", "catalog input: tag annotator (default: input, then offline)"),
              Param("quality", str, "auto", "catalog input: quality annotator"),
              Param("near_dups", str, "auto", "catalog input: the near-duplicate annotation (near_dup_<model>, or "
                                              "the model name) whose near-copies leave the pool"),
              Param("keep_near_duplicates", bool, False, "catalog input: select from every sample"),
              Param("random_trials", int, 5, "random selections the report compares against"))),
    Entry("selector", "cabs", "image_text", "CABS concept-aware batch plans for image-text training",
          "pipeline.curate.cabs_plan:CABSSelector", (
              Param("concepts", str, "auto", "concept annotator (default: input, caption, clip)"),
              Param("mode", str, "dm", choices=("dm", "fm")),
              Param("dm_mode", str, "paper", choices=("paper", "reference")),
              Param("cap", int, 10, "reference DM mode: per-concept cap (samples holding a capped concept drop out)"),
              Param("filter_ratio", float, 0.8),
              Param("power_of_two", bool, False, "batch = the largest power of two <= (1 - f) x super-batch, "
                                                 "as the reference sizes it"),
              Param("iid_draws", int, 5, "IID batches per step the report compares against (mean and spread)"),
              Param("superbatch", int, 20_480, "super-batch size (clipped to the pool when fit_superbatch)"),
              Param("fit_superbatch", bool, False, "use the pool size when the super-batch is larger"),
              Param("steps", int, 1), Param("seed", int, 0),
              Param("near_dups", str, None, "catalog input: near-duplicate annotation whose near-copies leave "
                                            "the pool"))),
    Entry("selector", "gais", "instruction", "GAIS graph-attention instance selection over labelled features",
          "pipeline.curate.gais_table:GAISSelector", (
              Param("label_column", str, REQUIRED, "class column (catalog: a samples column or 'tag')"),
              Param("features", str, None, "file input: a list<float> column or comma-separated numeric "
                                           "columns (default: all numeric)"),
              Param("embeddings", str, None, "catalog input: embedding model folder to use as features"),
              Param("sample_kind", str, "instruction", "catalog input: sample kind", KINDS),
              Param("variant", str, "multilevel", choices=("minibatch", "hash", "multilevel", "multiview", "knn")),
              Param("reduction", float, 0.96),
              Param("scoring", str, "same_class_coverage",  # wins vs baselines: docs/gais.md (issue 12)
                    choices=("same_class_coverage", "same_class", "other_class", "all")),
              Param("seed", int, 0),
              Param("scale", bool, True, "standardise the features first"))),
))

# ------------------------------------------------------------------------------ exporters

_ROWS_PER_FILE = Param("rows_per_file", int, 100_000, "rows per data file")

EXPORTERS = Registry("exporter", (
    Entry("exporter", "sharegpt", "instruction", "ShareGPT JSONL (conversations: from/value)",
          "pipeline.curate.materialise:export_sharegpt", (_ROWS_PER_FILE,), group="curated"),
    Entry("exporter", "alpaca", "instruction", "Alpaca JSONL (instruction/input/output, earlier turns in history)",
          "pipeline.curate.materialise:export_alpaca", (_ROWS_PER_FILE,), group="curated"),
    Entry("exporter", "openai", "instruction", "OpenAI chat JSONL (messages: role/content)",
          "pipeline.curate.materialise:export_openai", (_ROWS_PER_FILE,), group="curated"),
    Entry("exporter", "parquet", "instruction", "the curated rows with an assistant answer as Parquet (messages: role/content)",
          "pipeline.curate.materialise:export_parquet", (_ROWS_PER_FILE,), group="curated"),
    Entry("exporter", "dpo", "instruction", "preference pairs in TRL's conversational format (prompt/chosen/rejected), "
          "for the rows whose input had a rejected side (hh_rlhf)",
          "pipeline.curate.materialise:export_dpo", (_ROWS_PER_FILE,), group="curated"),
    Entry("exporter", "webdataset", "image_text", "WebDataset tar shards in batch-plan order (open_clip reads them)",
          "pipeline.curate.webdataset_export:export_webdataset", (
              Param("dataset", str, REQUIRED, "the image-text dataset the plan draws from"),
              Param("samples_per_shard", int, 1000, "most samples in one shard (a larger step is cut into parts)"),
              Param("min_shards", int, 8, "at least this many shards: open_clip needs shards >= --workers x "
                                          "world size (its --workers defaults to 4)"),
              Param("shards_per_step", int, None, "cut every planned step into this many shards (default: from "
                                                  "samples_per_shard and min_shards); the world size for "
                                                  "plan-order reading under DDP (docs/webdataset.md)"),
              Param("concepts", str, None, "concept annotator whose concepts go into each sample's JSON")),
          group="plan"),
))

REGISTRIES: dict[str, Registry] = {r.family: r for r in (ANNOTATORS, EMBEDDERS, SELECTORS, EXPORTERS)}


def all_entries() -> Iterator[Entry]:
    for reg in REGISTRIES.values():
        yield from reg.values()


def lookup(family: str, name: str) -> Entry:
    """``lookup("selector", "mig")``; KeyError naming the families or the choices when unknown."""
    if family not in REGISTRIES:
        raise KeyError(_unknown("step family", family, list(REGISTRIES)))
    return REGISTRIES[family][name]
