"""Entry point of quiet local SDK workers: ``python -m pipeline.stages.quiet_worker``.

:func:`pipeline.stages.runner.run_pipeline` starts the worker processes of a local multi-process
run (``--workers N``) with this command instead of Beam's ``python -m
apache_beam.runners.worker.sdk_worker_main``, unless ``THRESHER_VERBOSE`` is set. Nothing here
may import Beam before the logging set-up below: Beam logs a warning at import time.
"""

from __future__ import annotations

import logging
import sys


def main() -> None:
    """Beam's SDK harness (``apache_beam.runners.worker.sdk_worker_main``) without start-up chatter.

    Each worker process of a local multi-process run otherwise prints some twenty lines to the
    shared stderr (``Logging handler created.``, ``semi_persistent_directory: None``, ``No
    semi_persistent_directory found``, channel set-up, ``Python sdk harness starting/exiting``,
    and the ``apitools not found`` import warning): Beam's harness sets the root logger to INFO
    and a ``logging.warning`` at import gives it a stderr handler. Here stderr gets a handler of
    our own at WARNING, the harness module's start-up messages are kept below ERROR, and the
    apitools warning is dropped; real warnings and errors of the job still show. Pending progress
    counts are written before the process exits.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)  # before Beam's import-time logging.warning, so no basicConfig
    root.addFilter(lambda record: "apitools not found" not in record.getMessage())
    from apache_beam.runners.worker import sdk_worker_main

    logging.getLogger(sdk_worker_main.__name__).setLevel(logging.ERROR)
    try:
        sdk_worker_main.main(sys.argv)
    finally:
        from pipeline.stages.progress import flush_all

        flush_all()


if __name__ == "__main__":
    main()
