"""Runner selection: in-process by default, any Beam runner when its options are passed through.

Locally we run Beam's portable FnApiRunner directly: in one process (``workers == 1``) or with
``direct_running_mode=multi_processing`` (one SDK worker process per core). We never fall back to
Beam's Prism runner, which downloads a binary and so fails offline. Any other runner (Flink,
Spark, Dataflow) is used as soon as ``--runner`` appears in ``beam_args``; all its options pass
through unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions


def make_pipeline_options(workers: int = 1, beam_args: list[str] | None = None) -> PipelineOptions:
    args = list(beam_args or [])
    opts = PipelineOptions(args)
    if not _explicit_runner(args):
        direct = opts.view_as(DirectOptions)
        direct.direct_num_workers = max(1, workers)
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    return opts


def _explicit_runner(args: list[str]) -> bool:
    return any(a == "--runner" or a.startswith("--runner=") for a in args)


def run_pipeline(build: Callable[[beam.Pipeline], Any], options: PipelineOptions) -> Any:
    """Build and run a pipeline to completion; returns the runner's result (for metrics)."""
    runner = None
    if options.get_all_options().get("runner") is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
    p = beam.Pipeline(runner=runner, options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    return result
