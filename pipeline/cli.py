"""The ``thresher`` command line.

Each sub-command lives in its own module under ``pipeline/commands`` and is a thin layer over a
library function. Unknown ``--flags`` after a Beam job's command (``ingest``, ``embed``,
``annotate tags|quality``, ``concepts annotate``) go to Beam, so the same job runs on Flink,
Spark or Dataflow (``--runner FlinkRunner --flink_master ...``), but only flags that Beam
defines: anything else is a typo and stops the command at once, with a suggestion.

Mistakes a user can make (a mistyped option or choice, a catalog path that is a file, a missing
input, bad SQL) end with one ``thresher <command>: error: ...`` line and exit status 2; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import pipeline.commands

# Errors that mean "the user asked for something that cannot be done", not a bug. The OSError
# subclasses are the file-system ones: a path that is a file, a folder, missing or not writable.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _quiet_logs() -> None:
    # Beam logs every worker start at INFO; users want the summary, not the harness chatter.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Beam warns at import that optional Google Cloud clients are missing; irrelevant offline.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


VERBOSE_HELP = ("show INFO logs, Beam's included, and let local Beam workers print their start-up lines "
                "(also: THRESHER_VERBOSE=1)")


def _verbose_logs() -> None:
    """``--verbose``: INFO logs, and Beam's SDK workers started with Beam's own (chatty) command."""
    from pipeline.stages.progress import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1"  # read by run_pipeline, and inherited by worker processes
    logging.getLogger().setLevel(logging.INFO)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on ``parser`` and every (sub-)sub-command, so it may follow the command too."""
    if "--verbose" not in parser._option_string_actions:
        # SUPPRESS: a sub-command that was not given the flag does not reset the main one
        parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub)


def command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in sorted(pkgutil.iter_modules(pipeline.commands.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"pipeline.commands.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            modules[mod.NAME] = mod
    return modules


def build_parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thresher", description="Thresher: curate training data with Beam jobs, Prefect flows, FAISS and DuckDB.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in modules.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    _add_verbose(parser)
    return parser


def active_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub-)command parser that read ``args``, e.g. the one of ``annotate tags``."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[chosen]


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})


def suggest(word: str, *candidate_lists: list[str], cutoff: float = 0.7) -> str | None:
    """The closest candidate to ``word``; on a tie the earlier list wins (Thresher's own options)."""
    best, best_score = None, cutoff
    for candidates in candidate_lists:
        for c in difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff):
            score = difflib.SequenceMatcher(None, word, c).ratio()
            if best is None or score > best_score:
                best, best_score = c, score
    return best


def _unrecognised(flag: str, own: list[str], beam: list[str]) -> str:
    close = suggest(flag, own, beam)
    return f"unrecognised option {flag}" + (f" (did you mean {close}?)" if close else "")


def check_extra_args(extra: list[str], own: list[str], to_beam: bool) -> list[str]:
    """Problems with the arguments Thresher's parser did not recognise (empty: all fine).

    For a Beam job they must be options Beam defines (checked by
    :func:`pipeline.stages.runner.validate_beam_args`); for any other command there must be none.
    """
    if not extra:
        return []
    if not to_beam:
        flags = [a.split("=", 1)[0] for a in extra if a.startswith("--")]
        if flags:
            return [_unrecognised(f, own, []) for f in flags]
        return [f"unexpected arguments: {' '.join(extra)} (quote a value that contains spaces)"]
    from pipeline.stages.runner import beam_option_names, validate_beam_args

    beam = beam_option_names()
    problems = []
    for p in validate_beam_args(extra):
        if p.unknown and p.runner_may_define:
            # the runner's job service may define it, unless it is plainly a typo of our own option
            if suggest(p.option, own, cutoff=0.8):
                problems.append(_unrecognised(p.option, own, []))
        elif p.unknown:
            problems.append(_unrecognised(p.option, own, beam))
        else:
            problems.append(p.message)
    return problems


def check_choices(args: argparse.Namespace) -> list[str]:
    """Choice-valued options whose valid values live in the library (checked before any work)."""
    problems = []
    layout = getattr(args, "layout", None)
    if layout not in (None, "auto"):
        from pipeline.io.instruction_formats import LAYOUTS

        if layout not in LAYOUTS:
            problems.append(_bad_choice("--layout", layout, ["auto", *LAYOUTS]))
    container, kind = getattr(args, "container", None), getattr(args, "kind", None)
    if container not in (None, "auto") and kind in ("instruction", "image_text"):
        from pipeline.io.image_sources import CONTAINERS
        from pipeline.io.sources import INSTRUCTION_CONTAINERS

        valid = INSTRUCTION_CONTAINERS if kind == "instruction" else CONTAINERS
        if container not in valid:
            problems.append(_bad_choice("--format", container, ["auto", *valid], f" for --kind {kind}"))
    catalog = getattr(args, "catalog", None)
    if isinstance(catalog, str) and Path(catalog).expanduser().exists() and not Path(catalog).expanduser().is_dir():
        problems.append(f"catalog path {catalog} is a file, not a folder")
    return problems


def _bad_choice(option: str, value: str, valid: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"invalid {option} {value!r}{where}{hint}; choose from: {', '.join(valid)}"


def error_message(exc: BaseException) -> str:
    """A user-facing message: OSErrors as 'path: reason', KeyErrors without repr quotes."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def print_error(prog: str, message: str) -> None:
    """``prog: error: <first line>``; any further lines (e.g. DuckDB's SQL caret) indented below."""
    first, *rest = message.strip().splitlines() or [""]
    print(f"{prog}: error: {first}", file=sys.stderr)
    for line in rest:
        if line.strip():
            print(f"  {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import duckdb

    _quiet_logs()
    modules = command_modules()
    parser = build_parser(modules)
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse printed --help, or usage and the error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    from pipeline.stages.progress import verbose

    if getattr(args, "verbose", False) or verbose():
        _verbose_logs()
    mod = modules[args.command]
    leaf = active_parser(parser, args)
    # a sub-command can opt out of its module's PASSES_EXTRA_ARGS with set_defaults(passes_extra_args=False)
    to_beam = getattr(args, "passes_extra_args", getattr(mod, "PASSES_EXTRA_ARGS", False))
    problems = check_extra_args(extra, option_names(leaf), to_beam) + check_choices(args)
    catalog = getattr(args, "catalog", None)
    if isinstance(catalog, str) and not getattr(mod, "OBJECT_STORAGE", False):
        from pipeline.io.storage import is_url

        if is_url(catalog):  # commands that read the catalog's local folders directly
            problems.append(f"thresher {args.command} does not support object-storage catalogs yet ({catalog})")
    for flag in ("out", "output"):  # never a local folder named "s3:" by accident
        target = getattr(args, flag, None)
        if isinstance(target, str) and not getattr(mod, "OBJECT_STORAGE_OUT", False):
            from pipeline.io.storage import is_url

            if is_url(target):
                problems.append(f"thresher {args.command} --{flag} does not support object storage yet ({target});"
                                " write locally, then upload (pipeline.io.storage.publish_export for exports)")
    if problems:
        for problem in problems:
            print_error(leaf.prog, problem)
        return 2
    from pipeline.io.runs import CatalogBusy
    from pipeline.io.storage import CommitConflict, ObjectStorageUnsupported

    try:
        return mod.run(args, extra)
    except (CatalogBusy, CommitConflict) as exc:  # another run holds or took these outputs: try again later (EX_TEMPFAIL)
        print_error(leaf.prog, str(exc))
        return 75
    except (*USER_OS_ERRORS, ValueError, KeyError, duckdb.Error, ObjectStorageUnsupported) as exc:
        print_error(leaf.prog, error_message(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
