"""Pipeline specs: a curation pipeline as a YAML (or JSON) file, validated before anything runs.

A spec names the datasets to ingest, the steps to run on them with their parameters, the
selection algorithm, the curated set and its exports::

    name: my_instructions
    catalog: ../catalog                 # paths resolve relative to the spec file
    datasets:
      - dataset: chats
        inputs: [../data/chats.jsonl.gz]
    steps:
      - {step: embed, tier: int8}
      - {step: tags}
      - {step: quality}
      - {step: index, near_dup_threshold: 0.95}
    selection: {algorithm: mig, budget: 1000}
    exports: {formats: [sharegpt, parquet]}

Every mistake is reported at once, each with the path of the field that holds it and, for a
name, the allowed values (``steps[2].step: unknown 'tgas' (did you mean 'tags'?); allowed for
instruction data: embed, tags, quality, index``). Unknown fields are errors, never ignored.

This module imports neither Beam nor Prefect: ``thresher run --check`` validates without them,
and ``flows/run_spec.py`` turns a validated spec into Prefect tasks.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline import registry
from pipeline.registry import Entry, Param

Kind = Literal["instruction", "image_text"]
KINDS: tuple[str, ...] = ("instruction", "image_text")


class SpecError(ValueError):
    """A spec that cannot run: one line per problem, each ``<field path>: <what is wrong>``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the pipeline spec"
        super().__init__("\n".join([head, *problems]))


class Strict(BaseModel):
    # Unknown fields are typos until proven otherwise: refuse them rather than run without them.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- names and parameters --------------------------------------------------------------------------------
# Names, parameter types, defaults and choices come from pipeline/registry.py. What a spec adds:
# the step vocabulary (embed, index and one step per annotator group), and which of each entry's
# parameters the pipeline flow (flows/run_spec.py) passes on: FLOW_PARAMS, the one place that says
# so. A registered parameter missing there is refused with that reason, never silently dropped.

EMBED, INDEX = "embed", "index"
INDEX_PARAMS = (Param("near_dup_threshold", float, 0.95, "cosine at which two samples are near-copies"),)
_LLM = ("endpoint", "model", "api_key_env", "concurrency", "timeout", "retries", "max_tokens", "cache")
FLOW_PARAMS: dict[str, tuple[str, ...]] = {
    # registry entry name -> the parameters flows/run_spec.py passes to it. Left out on purpose:
    # output names (``name``: later steps look annotations up by their default names) and what
    # the flow fills in itself (MIG's and CABS's ``near_dups`` from the index step, GAIS's
    # ``embeddings`` and ``sample_kind``, the webdataset exporter's ``dataset``).
    "text": ("tier", "precision"),  # the curate_instructions embed task: the bundled MiniLM
    "clip": ("model_name", "pretrained"),
    "offline_tags": ("vocabulary", "top_k", "threshold", "tier", "device"),
    "llm_tags": _LLM,
    "offline_quality": ("use_embeddings", "tier"),
    "llm_quality": _LLM,
    "caption_concepts": ("vocabulary",),
    "clip_concepts": ("model_name", "pretrained", "top_k", "threshold", "vocabulary", "score", "template",
                      "batch_size", "device", "seed"),
    INDEX: ("near_dup_threshold",),
    "mig": ("budget", "fit_budget", "label_graph", "sim_threshold", "prop_weight", "phi", "phi_b", "phi_a",
            "phi_alpha", "norm", "tags", "quality", "keep_near_duplicates", "random_trials"),
    "cabs": ("concepts", "mode", "dm_mode", "filter_ratio", "superbatch", "fit_superbatch", "steps", "seed"),
    "gais": ("label_column", "variant", "reduction", "scoring", "seed", "scale"),
    "sharegpt": (), "alpaca": (), "openai": (), "parquet": (), "webdataset": (),
}
# Parameters that name files: resolved relative to the spec file like every other path
# (``pretrained`` only when such a file exists: otherwise it is an open_clip tag).
PATH_PARAMS = ("vocabulary", "label_graph", "cache")
MAYBE_PATH_PARAMS = ("pretrained",)
# The text tiers whose vectors agree with fp32 closely enough for the flow's thresholds (the
# curate_instructions flow's CHAIN_TIERS; static: recall@10 0.55, tag Jaccard 0.35).
CHAIN_TIERS = ("fp32", "int8")
# Ranges the registry's types do not say; the libraries check them too, but only once running.
BOUNDS: dict[str, tuple[float | None, float | None, bool]] = {  # name -> (low, high, low inclusive)
    "budget": (1, None, True), "superbatch": (1, None, True), "steps": (1, None, True),
    "filter_ratio": (0.0, 1.0, False), "reduction": (0.0, 1.0, False), "near_dup_threshold": (0.0, 1.0, False),
}
CHOOSER = {"embed": "embedder", "tags": "annotator", "quality": "annotator", "concepts": "annotator"}


def step_names(kind: str | None) -> list[str]:
    """embed, the annotator groups of ``kind`` (tags, quality / concepts), index."""
    groups = [e.group for e in registry.ANNOTATORS.values() if kind is None or e.kind == kind]
    return [EMBED, *dict.fromkeys(groups), INDEX]


def _runnable(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.name in FLOW_PARAMS]


def step_choices(step: str, kind: str) -> list[Entry]:
    """The registry entries a step of ``kind`` can use (first: the default), runnable ones only."""
    if step == EMBED:
        return _runnable([e for e in registry.EMBEDDERS.values() if e.kind == kind])
    return _runnable([e for e in registry.ANNOTATORS.values() if e.kind == kind and e.group == step])


def _option(entry: Entry) -> str:
    return entry.option or entry.name


def step_needs(step: str, impl: str | None) -> tuple[str, ...]:
    """Steps that must come earlier: the index, and the annotators that read the stored text
    vectors (those with a ``tier``), need the embed step."""
    if step == INDEX:
        return (EMBED,)
    if step != EMBED and impl and any(p.name == "tier" for p in registry.ANNOTATORS[impl].params):
        return (EMBED,)
    return ()


SELECTOR_NEEDS = {"gais": (EMBED,)}  # GAIS's features are the embeddings
# Selectors whose picks curation cannot take: GAIS writes a score and a kept flag per instance,
# not the ranked picks (rank, sample_id, gain) that curated sets and exports are built from.
NOT_CURATABLE = ("gais",)


# --- error helpers ---------------------------------------------------------------------------------------


def unknown_name(value: Any, allowed: list[str], what: str = "") -> str:
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {value!r}{hint}; allowed{what}: {', '.join(allowed)}"


def _fail(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    # "{message}" as the template: a message holding braces (a user's value) is never re-formatted
    err = PydanticCustomError("spec", "{message}", {"message": message})
    return ValidationError.from_exception_data("spec", [InitErrorDetails(type=err, loc=loc, input=value)])


def _errors(*fails: ValidationError) -> ValidationError:
    """Several problems as one error, so that all of them are reported together."""
    details = [InitErrorDetails(type=PydanticCustomError("spec", "{message}", {"message": _message(e)}),
                                loc=e["loc"], input=e.get("input")) for f in fails for e in f.errors()]
    return ValidationError.from_exception_data("spec", details)


def _message(e: dict[str, Any]) -> str:
    if e["type"] == "spec":
        return e["ctx"]["message"]
    if e["type"] == "extra_forbidden":
        return "unknown field (remove it, or check its spelling)"
    if e["type"] == "missing":
        return "required field is missing"
    if e["type"] == "literal_error":
        return f"{e['input']!r} is not allowed; expected {e['ctx']['expected']}"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    if "input" in e and not isinstance(e["input"], (dict, list)):
        return f"{msg} (got {e['input']!r})"
    return msg


def format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The spec model that holds the fields at ``path`` (list indexes skipped), if any."""
    def models(t: Any) -> list[type[BaseModel]]:
        if isinstance(t, type) and issubclass(t, BaseModel):
            return [t]
        return [m for a in typing.get_args(t) for m in models(a)]

    model: type[BaseModel] | None = PipelineSpec
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = next(iter(models(field.annotation)), None) if field else None
    return model


def problems(exc: ValidationError) -> list[str]:
    out = []
    for e in exc.errors():
        msg = _message(e)
        model = _model_at(e["loc"][:-1]) if e["type"] == "extra_forbidden" else None
        if model is not None:  # an unknown field: say which ones there are
            msg = f"unknown field; {unknown_name(e['loc'][-1], list(model.model_fields), ' fields').split('; ', 1)[1]}"
            close = difflib.get_close_matches(str(e["loc"][-1]), list(model.model_fields), n=1, cutoff=0.6)
            if close:
                msg = f"unknown field (did you mean {close[0]!r}?); allowed fields: {', '.join(model.model_fields)}"
        out.append(f"{format_loc(e['loc'])}: {msg}")
    return out


# --- paths -----------------------------------------------------------------------------------------------


def _is_uri(value: str) -> bool:
    return "://" in value


def _resolve(value: str, info: ValidationInfo) -> str:
    """A path relative to the spec file's folder (the validation context's ``base_dir``), made absolute."""
    if _is_uri(value):
        return value
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


# --- the spec --------------------------------------------------------------------------------------------


class DatasetSpec(Strict):
    """One dataset to ingest: the fields of :class:`flows.ingest.IngestSpec`."""

    dataset: str
    inputs: list[str] = Field(min_length=1)
    kind: Kind = "instruction"
    container: str = "auto"
    layout: str = "auto"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dataset")
    @classmethod
    def _name(cls, v: str) -> str:
        from pipeline.io.catalog import check_name

        return check_name(v, "dataset")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        out, missing = [], []
        for k, item in enumerate(v):
            path = _resolve(item, info)
            if not _is_uri(path) and not Path(path).exists():
                missing.append(_fail((k,), f"no such file or folder: {path}", item))
            out.append(path)
        if missing:
            raise _errors(*missing)
        return out

    @model_validator(mode="after")
    def _format(self) -> DatasetSpec:
        fails = []
        if self.kind == "instruction":
            from pipeline.io.instruction_formats import LAYOUTS
            from pipeline.io.sources import INSTRUCTION_CONTAINERS

            containers = ["auto", *INSTRUCTION_CONTAINERS]
            if self.layout not in ("auto", *LAYOUTS):
                fails.append(_fail(("layout",), unknown_name(self.layout, ["auto", *LAYOUTS]), self.layout))
            if self.options:
                fails.append(_fail(("options",), "instruction datasets take no options", self.options))
        else:
            from pipeline.io.image_sources import CAPTION_FROM, CONTAINERS, OPTION_NAMES

            containers = ["auto", *CONTAINERS]
            if self.layout != "auto":
                fails.append(_fail(("layout",), "layout applies to instruction datasets only", self.layout))
            for key, value in self.options.items():
                if key not in OPTION_NAMES:
                    fails.append(_fail(("options", key), unknown_name(key, list(OPTION_NAMES), " options"), key))
                elif key == "caption_from" and value not in CAPTION_FROM:
                    fails.append(_fail(("options", key), unknown_name(value, list(CAPTION_FROM)), value))
        if self.container not in containers:
            fails.append(_fail(("container",), unknown_name(self.container, containers, f" for {self.kind} data"),
                               self.container))
        if fails:
            raise _errors(*fails)
        return self

    def ingest_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`flows.ingest.IngestSpec`."""
        return self.model_dump()


def _split(data: Any, key: str) -> tuple[Any, dict[str, Any]]:
    if isinstance(data, str):  # "- tags" is short for "- {step: tags}"
        return data, {}
    if not isinstance(data, dict):
        raise _fail((), f"expected a name or a mapping with a {key!r} field, got {type(data).__name__}", data)
    if key not in data:
        raise _fail((key,), "required field is missing", data)
    rest = dict(data)
    return rest.pop(key), rest


def _in_bounds(name: str, value: Any) -> str | None:
    low, high, low_inclusive = BOUNDS.get(name, (None, None, True))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if low is not None and (value < low or (value == low and not low_inclusive)):
        return f"must be {'>=' if low_inclusive else '>'} {low}, got {value!r}"
    if high is not None and value > high:
        return f"must be <= {high}, got {value!r}"
    return None


def check_params(params: tuple[Param, ...], runnable: tuple[str, ...], given: dict[str, Any],
                 what: str) -> dict[str, Any]:
    """``given`` checked against the registry's ``params``: the runnable ones, defaults filled in.

    Every problem is raised together, each at its parameter's name.
    """
    by_name = {p.name: p for p in params}
    settable = [n for n in by_name if n in runnable]
    fails, out = [], {}
    for key, value in given.items():
        p = by_name.get(key)
        if p is None:
            msg = (unknown_name(key, settable, f" parameters of {what}") if settable
                   else f"unknown parameter: {what} takes none in a pipeline spec")
            fails.append(_fail((key,), msg, value))
        elif key not in runnable:
            fails.append(_fail((key,), f"{what} has this parameter, but pipeline specs cannot set it yet "
                                       f"(use the `thresher` command); settable: {', '.join(settable) or 'none'}",
                               value))
        else:
            try:
                out[key] = p.check(value, what)
            except ValueError as exc:  # "<what>: parameter 'x' must be ..." -> "must be ..."
                fails.append(_fail((key,), str(exc).split(f"parameter {key!r} ", 1)[-1], value))
                continue
            bad = _in_bounds(key, out[key])
            if bad:
                fails.append(_fail((key,), bad, value))
    for name in settable:
        p = by_name[name]
        if name not in given:
            if p.required:
                fails.append(_fail((name,), f"required field is missing ({p.help or p.type.__name__})", None))
            else:
                out[name] = p.default
    if fails:
        raise _errors(*fails)
    return {n: out[n] for n in settable if n in out}


def _resolve_params(given: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    base = Path(ctx.get("base_dir") or Path.cwd())
    out = dict(given)
    for key, value in given.items():
        if not isinstance(value, str) or _is_uri(value):
            continue
        local = base / Path(value).expanduser()
        if key in PATH_PARAMS or (key in MAYBE_PATH_PARAMS and local.exists()):
            out[key] = str(local.resolve())
    return out


class StepSpec(Strict):
    """One step: ``step`` (embed, tags, quality, concepts, index), the registry entry it runs
    (``impl``: chosen with ``embedder:`` / ``annotator:``, default the first runnable one) and
    its validated parameters."""

    step: str
    impl: str | None = None  # the registry entry's name; None for the index (not pluggable)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any, info: ValidationInfo) -> Any:
        name, given = _split(data, "step")
        ctx = info.context or {}
        kind = ctx.get("kind")
        allowed = step_names(kind)
        if name not in allowed:
            if kind and name in step_names(None):
                raise _fail(("step",), f"{name!r} is not a step for {kind} data; allowed: {', '.join(allowed)}", name)
            raise _fail(("step",), unknown_name(name, allowed, f" for {kind} data" if kind else ""), name)
        if kind is None:  # mixed kinds: reported once for the whole spec
            return {"step": name, "impl": None, "params": {}}
        if name == INDEX:
            return {"step": name, "impl": None,
                    "params": check_params(INDEX_PARAMS, FLOW_PARAMS[INDEX], given, "step 'index'")}
        chooser = CHOOSER[name]
        choices = step_choices(name, kind)
        option = given.pop(chooser, _option(choices[0]))
        entry = next((e for e in choices if _option(e) == option), None)
        if entry is None:
            registered = registry.EMBEDDERS.values() if name == EMBED else registry.ANNOTATORS.values()
            known = [_option(e) for e in registered if e.kind == kind and (name == EMBED or e.group == name)]
            usable = [_option(e) for e in choices]
            msg = (f"{chooser} {option!r} cannot run in a pipeline spec yet; allowed: {', '.join(usable)}"
                   if option in known else unknown_name(option, usable, f" {chooser}s of step {name!r}"))
            raise _fail((chooser,), msg, option)
        inherited = "tier" not in given and bool(ctx.get("tier")) and any(p.name == "tier" for p in entry.params)
        if inherited:
            given["tier"] = ctx["tier"]  # tags and quality read the vectors of the embed step's tier
        given = _resolve_params(given, ctx)
        params = check_params(entry.params, FLOW_PARAMS[entry.name], given, f"{entry.family} {entry.name!r}")
        if not inherited and params.get("tier", CHAIN_TIERS[0]) not in CHAIN_TIERS:
            raise _fail(("tier",), f"{params['tier']!r} is refused in a pipeline: its neighbours and tags agree "
                                   f"too little with fp32 (docs/embedding_tiers.md); allowed: {', '.join(CHAIN_TIERS)}",
                        params["tier"])
        return {"step": name, "impl": entry.name, "params": params}

    @property
    def option(self) -> str | None:
        if self.impl is None:
            return None
        return _option((registry.EMBEDDERS if self.step == EMBED else registry.ANNOTATORS)[self.impl])

    def to_dict(self) -> dict[str, Any]:
        """In the file's shape, so that a dumped spec validates again (deployment parameters)."""
        head = {"step": self.step}
        if self.impl is not None:
            head[CHOOSER[self.step]] = self.option
        return {**head, **self.params}


class SelectionSpec(Strict):
    algorithm: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any, info: ValidationInfo) -> Any:
        name, given = _split(data, "algorithm")
        kind = (info.context or {}).get("kind")
        names = list(registry.SELECTORS)
        if name not in names:
            raise _fail(("algorithm",), unknown_name(name, names), name)
        entry = registry.SELECTORS[name]
        if kind and entry.kind != kind:
            allowed = ", ".join(registry.SELECTORS.names(kind=kind))
            raise _fail(("algorithm",), f"{name!r} does not select {kind} data; allowed: {allowed}", name)
        given = _resolve_params(given, info.context or {})
        return {"algorithm": name,
                "params": check_params(entry.params, FLOW_PARAMS.get(name, ()), given, f"selector {name!r}")}

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, **self.params}


class CurateSpec(Strict):
    name: str | None = None  # the curated set (and export folder); default: the spec's name

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        from pipeline.io.catalog import check_name

        return None if v is None else check_name(v, "curated set")


class ExportsSpec(Strict):
    formats: list[str] = Field(default_factory=list)
    dir: str | None = None  # default: <catalog>/exports/<curated name>/

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _resolve(v, info)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str], info: ValidationInfo) -> list[str]:
        kind = (info.context or {}).get("kind")
        allowed = [n for n in registry.EXPORTERS.names(kind=kind) if n in FLOW_PARAMS]
        fails = [_fail((k,), unknown_name(f, allowed, f" for {kind} data" if kind else ""), f)
                 for k, f in enumerate(v) if f not in allowed]
        if fails:
            raise _errors(*fails)
        if len(set(v)) != len(v):
            raise ValueError(f"a format is listed twice: {v}")
        return v


class PipelineSpec(Strict):
    name: str
    catalog: str
    datasets: list[DatasetSpec] = Field(min_length=1)
    steps: list[StepSpec] = Field(default_factory=list)
    selection: SelectionSpec | None = None
    curate: CurateSpec = Field(default_factory=CurateSpec)
    exports: ExportsSpec = Field(default_factory=ExportsSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from pipeline.io.catalog import check_name

        return check_name(v, "pipeline")

    @field_validator("catalog")
    @classmethod
    def _catalog(cls, v: str, info: ValidationInfo) -> str:
        path = _resolve(v, info)
        if not _is_uri(path) and Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{path} is a file, not a folder")
        return path

    @property
    def kind(self) -> str:
        return self.datasets[0].kind

    def step(self, name: str) -> StepSpec | None:
        return next((s for s in self.steps if s.step == name), None)

    def curated_name(self, dataset: str) -> str:
        base = self.curate.name or self.name
        return base if len(self.datasets) == 1 else f"{base}-{dataset}"

    def export_dir(self, dataset: str) -> str:
        name = self.curated_name(dataset)
        if self.exports.dir is None:
            return str(Path(self.catalog) / "exports" / name)
        return self.exports.dir if len(self.datasets) == 1 else str(Path(self.exports.dir) / name)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-ready data (paths absolute): it validates again unchanged."""
        return {"name": self.name, "catalog": self.catalog,
                "datasets": [d.model_dump() for d in self.datasets],
                "steps": [s.to_dict() for s in self.steps],
                "selection": None if self.selection is None else self.selection.to_dict(),
                "curate": self.curate.model_dump(), "exports": self.exports.model_dump()}


def _cross_checks(spec: PipelineSpec) -> list[str]:
    """What only the whole spec can tell: distinct names, steps in a runnable order, one tier."""
    out = []
    seen: dict[str, int] = {}
    for k, d in enumerate(spec.datasets):
        if d.dataset in seen:
            out.append(f"datasets[{k}].dataset: {d.dataset!r} is already datasets[{seen[d.dataset]}]")
        seen.setdefault(d.dataset, k)
    done: dict[str, int] = {}
    for k, s in enumerate(spec.steps):
        if s.step in done:
            out.append(f"steps[{k}].step: {s.step!r} is already steps[{done[s.step]}]")
        for need in step_needs(s.step, s.impl):
            if need not in done:
                out.append(f"steps[{k}].step: {s.step!r} reads what {need!r} writes; add {{step: {need}}} before it")
        done.setdefault(s.step, k)
    tiers = {s.params["tier"] for s in spec.steps if "tier" in s.params}
    if len(tiers) > 1:
        out.append(f"steps: tags and quality read the vectors of the embed step's tier; give every step the same "
                   f"tier (found {', '.join(sorted(tiers))})")
    if spec.selection is not None:
        for need in SELECTOR_NEEDS.get(spec.selection.algorithm, ()):
            if need not in done:
                out.append(f"selection.algorithm: {spec.selection.algorithm!r} reads what {need!r} writes; "
                           f"add {{step: {need}}} to steps")
        if spec.selection.algorithm in NOT_CURATABLE and (spec.exports.formats or spec.curate.name):
            out.append(f"selection.algorithm: {spec.selection.algorithm!r} scores and flags instances but does not "
                       "rank picks, so it cannot be curated or exported yet; remove `curate` and `exports` (the "
                       "selection is written to selections/<name>/), or use "
                       f"{', '.join(n for n in registry.SELECTORS.names(kind=spec.kind) if n not in NOT_CURATABLE)}")
    elif spec.exports.formats:
        out.append("exports.formats: exports need a selection (add a `selection:` section)")
    return out


def validate_spec(raw: Any, base_dir: str | Path | None = None, source: str = "spec") -> PipelineSpec:
    """A :class:`PipelineSpec` from parsed YAML/JSON, or :class:`SpecError` listing every problem."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"(top level): expected a mapping of fields, got {type(raw).__name__}"])
    datasets = raw.get("datasets") if isinstance(raw.get("datasets"), list) else []
    kinds = sorted({str(d.get("kind", "instruction")) for d in datasets if isinstance(d, dict)})
    # Steps, selectors and exports depend on the kind of data: mixed kinds are one problem, not many.
    found = ([f"datasets: one spec curates one kind of data; found {', '.join(kinds)} (write one spec per kind)"]
             if len(kinds) > 1 else [])
    steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    embed = next((st for st in steps if isinstance(st, dict) and st.get("step") == EMBED), {})
    context = {"base_dir": str(base_dir) if base_dir else None,
               "kind": kinds[0] if len(kinds) == 1 and kinds[0] in KINDS else None,
               "tier": embed.get("tier") if isinstance(embed.get("tier"), str) else None}
    try:
        spec = PipelineSpec.model_validate(raw, context=context)
    except ValidationError as exc:
        raise SpecError(source, found + problems(exc)) from None
    found += _cross_checks(spec)
    if found:
        raise SpecError(source, found)
    return spec


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file (YAML, or JSON, which YAML reads too)."""
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such spec file") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        language = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError(str(path), [f"(file): not valid {language}: {exc}"]) from None
    return validate_spec(raw, base_dir=path.resolve().parent, source=str(path))
