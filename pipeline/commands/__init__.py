"""One module per ``thresher`` sub-command, discovered by ``pipeline.cli``.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args, extra_args) -> int``; adding a command never means editing the CLI's core. Imports of
heavy libraries belong inside ``run`` so that ``thresher --help`` stays fast.
"""

import os

DEFAULT_CATALOG = os.environ.get("THRESHER_CATALOG", "catalog")


def add_catalog_argument(parser, default: str | None = None) -> None:
    parser.add_argument("--catalog", default=default or DEFAULT_CATALOG,
                        help="catalog folder (default: $THRESHER_CATALOG or ./catalog)")
