"""thresher select <selector>: run a registered selector into selections/<name>/ (or a file).

One sub-command per entry of ``pipeline.registry.SELECTORS``; its options are the entry's
parameters (``--budget``, ``--phi`` ...), so a new selector needs no edit here. Every selector
takes its pool from a catalog dataset (``--catalog C --dataset D``; ``--input C#D`` still works)
or from a file (``--input FILE``), and writes through ``pipeline.select.protocol``: into the
catalog's ``selections/<name>/`` under the stage contract (lock, verified skip, ledger entry),
and/or to ``--out FILE`` (a file input with ``--out`` alone touches no catalog).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import add_catalog_argument
from pipeline.registry import SELECTORS, Param

NAME = "select"
HELP = "select samples with a registered selector: " + ", ".join(
    f"{e.name} ({e.kind})" for e in SELECTORS.values())

# What --input FILE holds, per selector (the catalog form is the same for all).
INPUT_FILE = {
    "mig": "an xsample-layout JSONL(.gz) file",
    "cabs": "a Parquet file with sample_id and a list of concepts per sample",
    "gais": "a Parquet table with a label column and numeric or list<float> feature columns",
}


def _add_param(p: argparse.ArgumentParser, param: Param) -> None:
    help_ = param.help or None
    if param.type is bool:
        if param.default is True:
            p.add_argument("--no-" + param.flag[2:], dest=param.name, action="store_false",
                           help=f"do not: {param.help}" if param.help else None)
        else:
            p.add_argument(param.flag, dest=param.name, action="store_true", help=help_)
        return
    choices = param.choice_values()
    kwargs = {"dest": param.name, "type": param.type, "help": help_, "choices": choices}
    if param.required:
        p.add_argument(param.flag, required=True, **kwargs)
    else:
        p.add_argument(param.flag, default=param.default, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="algorithm", required=True)
    for entry in SELECTORS.values():
        s = sub.add_parser(entry.name, help=entry.help, description=entry.help)
        add_catalog_argument(s)
        src = s.add_argument_group("pool (one of)")
        src.add_argument("--dataset", help="a catalog dataset (with --catalog)")
        src.add_argument("--input", help=f"{INPUT_FILE.get(entry.name, 'a file')}, or a catalog dataset as "
                                         "CATALOG#DATASET")
        dst = s.add_argument_group("output")
        dst.add_argument("--name", help="selection name: writes selections/NAME/ (picks.parquet, report.json) in "
                                        "--catalog; default for a catalog pool: <dataset>_" + entry.name)
        dst.add_argument("--out", help="also write the picks to this Parquet file (+ .report.json); with a file "
                                       "input and no --name, only there")
        dst.add_argument("--force", action="store_true", help="select again even if inputs and parameters are unchanged")
        opts = s.add_argument_group(f"{entry.name} parameters")
        for param in entry.params:
            _add_param(opts, param)


def _pool_source(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(catalog, dataset, input file): exactly one of a dataset or a file."""
    if args.dataset and args.input:
        raise ValueError("give either --dataset (a catalog dataset) or --input (a file), not both")
    if args.dataset:
        return args.catalog, args.dataset, None
    if not args.input:
        raise ValueError("give --dataset NAME (with --catalog) or --input FILE")
    if "#" in args.input and not Path(args.input).exists():
        catalog, dataset = args.input.rsplit("#", 1)
        return catalog, dataset, None
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input} is neither a file nor CATALOG#DATASET")
    return None, None, args.input


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.select import protocol

    entry = SELECTORS[args.algorithm]
    params = {p.name: getattr(args, p.name) for p in entry.params}
    catalog, dataset, input_file = _pool_source(args)
    if dataset is not None:
        result = protocol.select_into_catalog(entry.name, catalog, args.name or f"{dataset}_{entry.name}", params,
                                              dataset=dataset, out=args.out, force=args.force)
    elif args.name:
        result = protocol.select_into_catalog(entry.name, args.catalog, args.name, params, input_file=input_file,
                                              out=args.out, force=args.force)
    elif args.out:
        result = protocol.select_to_file(entry.name, input_file, args.out, params)  # type: ignore[arg-type]
    else:
        raise ValueError("give --name NAME (writes selections/NAME/ in --catalog) and/or --out FILE")
    print("\n".join(result.lines()))
    return 0
