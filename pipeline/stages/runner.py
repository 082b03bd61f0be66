"""Runner selection: in-process by default, any Beam runner when its options are passed through.

Locally we run Beam's portable FnApiRunner directly: in one process (``workers == 1``) or with
``direct_running_mode=multi_processing`` (one SDK worker process per core). We never fall back to
Beam's Prism runner, which downloads a binary and so fails offline. Any other runner (Flink,
Spark, Dataflow, Dask) is used as soon as ``--runner`` appears in ``beam_args``; its options pass
through unchanged. :func:`validate_beam_args` checks such arguments against the options Beam
defines, so that a typo fails at once instead of being ignored by Beam.

Beam's Dask runner (``--runner dask``, which Beam itself knows only by its full class name) runs
on a dask.distributed cluster: ``--dask_client_address tcp://HOST:PORT`` names its scheduler;
without an address (or ``--dask_scheduler_file``) :func:`run_pipeline` starts a local cluster of
``workers`` processes for the run and stops it afterwards. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from pipeline.stages.progress import verbose


def make_pipeline_options(workers: int = 1, beam_args: list[str] | None = None) -> PipelineOptions:
    """Options for a Thresher Beam job: the in-process runner with ``workers``, unless ``--runner``.

    ``--runner dask`` (or ``DaskRunner``) becomes Beam's full Dask runner class name. On Dask, the
    elements a stage starts from (input shards, input files) are its units of work, so unless
    ``--dask_npartitions`` or ``--dask_partition_size`` is given each one gets its own Dask
    partition: Beam's default of 128 elements a partition would put a whole stage on one worker
    (its Dask runner does not redistribute at a ``Reshuffle``).
    """
    args = _normalise_runner(list(beam_args or []))
    if is_dask_runner(args):
        _check_dask_installed()
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - defines DaskOptions, so they parse
    if is_dask_runner(args) and not any(a.split("=", 1)[0] in ("--dask_npartitions", "--dask_partition_size")
                                        for a in args):
        args.append("--dask_partition_size=1")
    opts = PipelineOptions(args)
    direct = opts.view_as(DirectOptions)
    if not _explicit_runner(args):
        direct.direct_num_workers = max(1, workers)
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    elif is_dask_runner(args) and "--direct_num_workers" not in {a.split("=", 1)[0] for a in args}:
        # Ignored by the Dask runner itself: run_pipeline reads it as the size of a local cluster.
        direct.direct_num_workers = max(1, workers)
    return opts


def _explicit_runner(args: list[str]) -> bool:
    return any(a == "--runner" or a.startswith("--runner=") for a in args)


def _runner_value(args: list[str]) -> str | None:
    value = None
    for i, a in enumerate(args):
        if a == "--runner" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--runner="):
            value = a.split("=", 1)[1]
    return value


def _is_dask_name(runner: str | None) -> bool:
    return runner is not None and (runner.lower() in ("dask", "daskrunner") or runner == DASK_RUNNER)


def is_dask_runner(beam_args: list[str] | None) -> bool:
    """Whether ``beam_args`` choose Beam's Dask runner (by short or full name)."""
    return _is_dask_name(_runner_value(list(beam_args or [])))


def _normalise_runner(args: list[str]) -> list[str]:
    """``--runner dask`` / ``DaskRunner`` -> Beam's full class name (the only one Beam accepts)."""
    out = []
    for i, a in enumerate(args):
        if a.startswith("--runner=") and _is_dask_name(a.split("=", 1)[1]):
            a = f"--runner={DASK_RUNNER}"
        elif i > 0 and args[i - 1] == "--runner" and _is_dask_name(a):
            a = DASK_RUNNER
        out.append(a)
    return out


DASK_MODULES = ("dask", "distributed")  # what Beam's Dask runner imports (pip install 'dask[distributed]')


def _dask_missing() -> str | None:
    import importlib.util

    missing = [m for m in DASK_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"--runner dask needs dask[distributed] ({' and '.join(missing)} not installed): "
                "pip install 'dask[distributed]'")
    return None


def _check_dask_installed() -> None:
    problem = _dask_missing()
    if problem:
        raise RuntimeError(problem)


def run_pipeline(build: Callable[[beam.Pipeline], Any], options: PipelineOptions,
                 progress_dir: str | os.PathLike[str] | None = None) -> Any:
    """Build and run a pipeline to completion; returns the runner's result (for metrics).

    ``progress_dir`` (a :func:`pipeline.stages.progress.watch` folder) is stamped onto every
    Thresher DoFn of the pipeline, so that ``progress.tick(self, n)`` in their ``process``
    reports there, in whichever process or machine they run. Local multi-process runs start
    their SDK workers quietly unless ``THRESHER_VERBOSE`` is set (:mod:`pipeline.stages.quiet_worker`).
    """
    runner = None
    direct = options.view_as(DirectOptions)
    mode = direct.direct_running_mode
    if _is_dask_name(options.view_as(StandardOptions).runner):
        return _run_on_dask(build, options, progress_dir)
    if options.get_all_options().get("runner") is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        if mode == "multi_processing" and not verbose():
            from apache_beam.transforms.environments import SubprocessSDKEnvironment

            # Beam's own worker command for this mode, with our quiet entry point; the mode is
            # cleared for the run (and restored below) so that Beam does not put its own back.
            command = f"{shlex.quote(sys.executable)} -m pipeline.stages.quiet_worker"
            runner = FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))
            direct.direct_running_mode = None
        else:
            runner = FnApiRunner()
    try:
        p = beam.Pipeline(runner=runner, options=options)
        build(p)
        if progress_dir is not None:
            _stamp_progress(p, os.fspath(progress_dir))
        result = p.run()
        result.wait_until_finish()
    finally:
        direct.direct_running_mode = mode
    return result


def _run_on_dask(build: Callable[[beam.Pipeline], Any], options: PipelineOptions,
                 progress_dir: str | os.PathLike[str] | None) -> Any:
    """Run on Beam's Dask runner; a local cluster of ``workers`` processes when no scheduler is named.

    Beam's runner opens a dask.distributed client per run and never closes it; it is closed here
    once the run ends, so that a flow running many stages does not pile up connections (or, with
    Beam's own default, whole local clusters).
    """
    _check_dask_installed()
    from apache_beam.runners.dask.dask_runner import DaskOptions

    options.view_as(StandardOptions).runner = DASK_RUNNER  # a short name, when set programmatically
    dask_opts = options.view_as(DaskOptions)
    cluster = None
    dask_log = logging.getLogger("distributed")
    log_level = dask_log.level
    if not verbose():  # dask logs every connection, worker start and stop at INFO
        dask_log.setLevel(logging.ERROR)
    result = None
    try:
        if not dask_opts.address and not dask_opts.scheduler_file:
            from distributed import LocalCluster

            # Worker processes (not threads): DoFns hold the GIL, and this is what a real cluster
            # does. The dashboard is off: it needs bokeh, and nobody watches a one-run cluster.
            workers = max(1, options.view_as(DirectOptions).direct_num_workers or 1)
            with warnings.catch_warnings():
                # its status server falls back to a free port when another cluster holds 8787
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
            dask_opts.address = cluster.scheduler_address
        p = beam.Pipeline(options=options)
        build(p)
        if progress_dir is not None:
            _stamp_progress(p, os.fspath(progress_dir))
        result = p.run()
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
        if cluster is not None:
            dask_opts.address = None
            cluster.close()
        dask_log.setLevel(log_level)
    return result


def _stamp_progress(p: beam.Pipeline, folder: str) -> None:
    """Give every DoFn that is not Beam's own the progress folder (see pipeline.stages.progress)."""
    from apache_beam.pipeline import PipelineVisitor

    from pipeline.stages.progress import DOFN_ATTR

    class Stamp(PipelineVisitor):
        def visit_transform(self, node) -> None:
            fn = getattr(node.transform, "fn", None)
            if isinstance(fn, beam.DoFn) and not type(fn).__module__.startswith("apache_beam."):
                try:
                    setattr(fn, DOFN_ATTR, folder)
                except (AttributeError, TypeError):
                    pass

    p.visit(Stamp())


# --------------------------------------------------------------------------------------------
# Checking pass-through arguments before any work starts
# --------------------------------------------------------------------------------------------

# Runners that submit to a job service: the service may define further options of its own
# (Beam asks it for them at submit time), so names unknown here can still be valid there.
JOB_SERVICE_RUNNERS = frozenset({"flinkrunner", "sparkrunner", "portablerunner", "prismrunner",
                                 "kafkastreamsrunner"})
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"  # Beam knows it only by this full name


class BeamArgProblem(NamedTuple):
    """One thing wrong with the arguments meant for Beam.

    ``option`` is the offending ``--flag`` as typed (without ``=value``), or ``None`` for a stray
    value; ``unknown`` is true when the flag is no Beam option at all (a caller may suggest a
    close name); ``runner_may_define`` is true when the chosen runner's job service might still
    accept it.
    """

    option: str | None
    message: str
    unknown: bool = False
    runner_may_define: bool = False

    def __str__(self) -> str:
        return self.message


class _ArgError(Exception):
    pass


class _CheckingParser(argparse.ArgumentParser):
    """Beam's own option parser (no abbreviations), raising instead of exiting on bad values."""

    def __init__(self) -> None:
        super().__init__(allow_abbrev=False, add_help=False, conflict_handler="resolve")

    def add_value_provider_argument(self, *args, **kwargs):  # templated (ValueProvider) options
        kwargs.pop("type", None)
        self.add_argument(*args, **kwargs)

    def error(self, message):
        raise _ArgError(message)


def _option_classes() -> list[type]:
    """Every PipelineOptions subclass that defines options (direct and deeper), Beam's first."""
    try:  # not imported by Beam by default; needs dask, which may be absent
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    except ImportError:
        pass
    seen: dict[str, type] = {}
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop(0)
        if "_add_argparse_args" in cls.__dict__:
            seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        stack.extend(cls.__subclasses__())
    return list(seen.values())


def _dask_options_from_source() -> list[tuple[str, bool]]:
    """(--flag, is_switch) pairs of Beam's DaskOptions, read from its source when dask is missing.

    Beam's Dask runner module imports dask at the top, so without dask installed its options are
    unknown to Python; reading them from the file keeps ``--dask_client_address ...`` accepted
    (the run itself then says that dask is missing).
    """
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("apache_beam.runners.dask.dask_runner")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8")) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError):
        return []
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "DaskOptions") if tree else ():
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
            if not (isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument" and call.args):
                continue
            first = call.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("--"):
                action = next((k.value.value for k in call.keywords if k.arg == "action"
                               and isinstance(k.value, ast.Constant)), None)
                found.append((first.value, action in ("store_true", "store_false")))
    return found


@functools.lru_cache(maxsize=1)
def _beam_parser() -> _CheckingParser:
    parser = _CheckingParser()
    for cls in _option_classes():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    known = {s for a in parser._actions for s in a.option_strings}  # pylint: disable=protected-access
    for flag, switch in _dask_options_from_source():
        if flag not in known:
            parser.add_argument(flag, action="store_true" if switch else "store")
    return parser


def beam_option_names() -> list[str]:
    """Every ``--flag`` Beam's options classes define (plus the Dask runner's), sorted."""
    actions = _beam_parser()._actions  # pylint: disable=protected-access
    return sorted({s for a in actions for s in a.option_strings if s.startswith("--")})


def known_runner_names() -> list[str]:
    """The short names ``--runner`` accepts (case-insensitive, the ``Runner`` suffix optional).

    Beam's own list, plus ``DaskRunner``, which :func:`make_pipeline_options` turns into the full
    class name Beam needs.
    """
    return [*StandardOptions.KNOWN_RUNNER_NAMES, "DaskRunner"]


def _runner_problem(runner: str) -> BeamArgProblem | None:
    if _is_dask_name(runner):
        missing = _dask_missing()
        return BeamArgProblem("--runner", missing) if missing else None
    if "." in runner:  # a fully qualified PipelineRunner class: Beam imports it when the job starts
        return None
    names = {n.lower(): n for n in known_runner_names()}
    if runner.lower() in names or runner.lower() + "runner" in names or runner.lower() == "pythonrpcdirectrunner":
        return None
    close = difflib.get_close_matches(runner, list(names.values()), n=1)
    hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(names.values())}"
    return BeamArgProblem("--runner", f"unknown runner {runner!r} for --runner{hint}")


def _looks_like_option(token: str) -> bool:
    if not token.startswith("-") or token in ("-", "--"):
        return False
    try:
        float(token)  # a negative number is a value
        return False
    except ValueError:
        return True


def validate_beam_args(args: list[str]) -> list[BeamArgProblem]:
    """Problems with arguments meant for Beam: unknown options, bad values, an unknown runner.

    An empty list means Beam accepts every argument. Options are those that Beam's
    ``PipelineOptions`` subclasses define (and the Dask runner's); when ``--runner`` names a
    runner that submits to a job service (Flink, Spark, Portable, Prism), other options may be
    defined by that service, and are flagged with ``runner_may_define``.
    """
    args = list(args)
    if not args:
        return []
    try:
        known, unknown = _beam_parser().parse_known_args(args)
    except _ArgError as exc:
        return [BeamArgProblem(None, str(exc))]
    problems = []
    runner = getattr(known, "runner", None)
    if runner:
        problem = _runner_problem(str(runner))
        if problem:
            problems.append(problem)
    job_service = bool(runner) and str(runner).rsplit(".", 1)[-1].lower() in JOB_SERVICE_RUNNERS
    i = 0
    while i < len(unknown):
        token = unknown[i]
        if token == "--":
            problems.append(BeamArgProblem(None, f"unexpected arguments after --: {' '.join(unknown[i + 1:])}"))
            break
        if _looks_like_option(token):
            flag = token.split("=", 1)[0]
            problems.append(BeamArgProblem(flag, f"unrecognised option {flag}", unknown=True,
                                           runner_may_define=job_service))
            # its value, if any, belongs to it: do not report it separately
            if "=" not in token and i + 1 < len(unknown) and not _looks_like_option(unknown[i + 1]):
                i += 1
        else:
            problems.append(BeamArgProblem(None, f"unexpected argument {token!r}"))
        i += 1
    return problems
