"""thresher select mig|cabs|gais: run a selection algorithm and write its picks."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import add_catalog_argument

NAME = "select"
HELP = "select samples with MIG (instructions), CABS (image-text batches) or GAIS (instances)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="algorithm", required=True)

    m = sub.add_parser("mig", help="MIG information-gain selection over tagged, scored instructions")
    m.add_argument("--input", required=True,
                   help="an xsample-layout JSONL(.gz) file, or a catalog dataset as CATALOG#DATASET")
    m.add_argument("--budget", type=int, required=True)
    m.add_argument("--out", required=True, help="OUT.parquet: rank, index, sample_id, gain, labels")
    m.add_argument("--label-graph", help="Parquet edge list (label_a, label_b, similarity) replacing the embedding graph")
    m.add_argument("--sim-threshold", type=float, default=None, help="T for the embedding-built label graph")
    m.add_argument("--prop-weight", type=float, default=1.0, help="alpha: weight of neighbouring labels")
    m.add_argument("--phi", choices=["pow", "exp"], default="pow")
    m.add_argument("--phi-b", type=float, default=0.8)
    m.add_argument("--phi-a", type=float, default=1e-6)
    m.add_argument("--phi-alpha", type=float, default=1.0)
    m.add_argument("--norm", action="store_true", help="score / number of labels")
    m.add_argument("--tags", default="auto", help="catalog input: tag annotator (default: input, then offline)")
    m.add_argument("--quality", default="auto", help="catalog input: quality annotator")
    m.add_argument("--random-trials", type=int, default=5)
    m.add_argument("--near-dups", default="auto", metavar="ANNOTATOR",
                   help="catalog input: the near-duplicate annotation (near_dup_<model>, or the model name) whose "
                        "near-copies leave the pool, as in the curate_instructions flow (default: the dataset's "
                        "own, when `thresher index --near-dup` made one)")
    m.add_argument("--keep-near-duplicates", action="store_true",
                   help="catalog input: select from every sample, near-copies included")

    c = sub.add_parser("cabs", help="CABS concept-aware batch plans for image-text training")
    c.add_argument("--dataset", help="catalog dataset with concept annotations")
    add_catalog_argument(c)
    c.add_argument("--input", help="or: a Parquet file with sample_id and a list of concepts per sample")
    c.add_argument("--concepts", default="auto", help="concept annotator (default: input, caption, clip)")
    c.add_argument("--mode", choices=["dm", "fm"], default="dm")
    c.add_argument("--dm-mode", choices=["paper", "reference"], default="paper")
    c.add_argument("--filter-ratio", type=float, default=0.8)
    c.add_argument("--superbatch", type=int, default=20_480)
    c.add_argument("--steps", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="PLAN.parquet: step, position, sample_id, gain")


    g = sub.add_parser("gais", help="GAIS graph-attention instance selection over labelled features")
    g.add_argument("--input", required=True, help="a Parquet table, or a catalog dataset as CATALOG#DATASET")
    g.add_argument("--label-column", required=True, help="class column (catalog: a samples column or 'tag')")
    g.add_argument("--features", help="a list<float> column or comma-separated numeric columns (default: all numeric)")
    g.add_argument("--embeddings", help="catalog input: embedding model folder to use as features")
    g.add_argument("--kind", choices=["instruction", "image_text"], default="instruction")
    g.add_argument("--variant", choices=["minibatch", "hash", "multilevel", "multiview", "knn"], default="multilevel")
    g.add_argument("--reduction", type=float, default=0.96)
    g.add_argument("--scoring", choices=["same_class", "other_class", "all"], default="same_class")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-scale", action="store_true", help="features are already scaled")
    g.add_argument("--out", required=True, help="OUT.parquet: index, sample_id, label, score, selected")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.algorithm == "mig":
        return _mig(args)
    if args.algorithm == "cabs":
        return _cabs(args)
    if args.algorithm == "gais":
        return _gais(args)
    raise ValueError(f"unknown algorithm {args.algorithm}")


def _mig(args: argparse.Namespace) -> int:
    from pipeline.curate import mig_pool
    from pipeline.select.mig import MINILM_DEFAULT_THRESHOLD, MIGConfig

    config = MIGConfig(sim_threshold=args.sim_threshold or MINILM_DEFAULT_THRESHOLD, prop_weight=args.prop_weight,
                       phi=args.phi, phi_b=args.phi_b, phi_a=args.phi_a, phi_alpha=args.phi_alpha, norm=args.norm)
    if "#" in args.input and not Path(args.input).exists():
        catalog, dataset = args.input.rsplit("#", 1)
        near = None if args.keep_near_duplicates else args.near_dups
        pool = mig_pool.pool_from_catalog(catalog, dataset, args.tags, args.quality, near_duplicates=near)
        if pool.notes.get("near_duplicates_from"):
            print(f"near-duplicates: excluded {pool.notes['near_duplicates_excluded']:,} samples that "
                  f"{pool.notes['near_duplicates_from']} marks as near-copies (--keep-near-duplicates keeps them)")
        elif pool.notes.get("near_duplicates_note"):
            print(pool.notes["near_duplicates_note"])
        elif args.keep_near_duplicates:
            print("near-duplicates: kept (--keep-near-duplicates)")
    else:
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"--input {args.input} is neither a file nor CATALOG#DATASET")
        pool = mig_pool.pool_from_xsample(args.input)
    table, report = mig_pool.select(pool, args.budget, config, edges=args.label_graph,
                                    random_trials=args.random_trials)
    params = {"input": args.input, "budget": args.budget, "label_graph": args.label_graph,
              "near_duplicates": pool.notes.get("near_duplicates_from"), **config.__dict__}
    out = mig_pool.write_selection(table, report, args.out, params)
    print("\n".join(report.lines()))
    print(f"wrote {table.num_rows} picks to {out} (report: {out.with_suffix('.report.json')})")
    return 0


def _cabs(args: argparse.Namespace) -> int:
    from pipeline.curate import cabs_plan

    if bool(args.dataset) == bool(args.input):
        raise ValueError("give exactly one of --dataset (catalog) or --input (Parquet file)")
    pool = (cabs_plan.concepts_from_catalog(args.catalog, args.dataset, args.concepts) if args.dataset
            else cabs_plan.concepts_from_file(args.input))
    table, report = cabs_plan.plan(pool, args.mode, args.filter_ratio, args.superbatch, args.steps, args.seed,
                                   args.dm_mode)
    params = {k: getattr(args, k) for k in ("dataset", "input", "concepts", "mode", "dm_mode", "filter_ratio",
                                            "superbatch", "steps", "seed")}
    out = cabs_plan.write_plan(table, report, args.out, params)
    print("\n".join(report.lines()))
    print(f"wrote {table.num_rows} rows to {out}")
    return 0


def _gais(args: argparse.Namespace) -> int:
    from pipeline.curate import gais_table

    if "#" in args.input and not Path(args.input).exists():
        if not args.embeddings:
            raise ValueError("a catalog input needs --embeddings MODEL (the features)")
        catalog, dataset = args.input.rsplit("#", 1)
        inst = gais_table.instances_from_catalog(catalog, dataset, args.label_column, args.embeddings, args.kind)
    else:
        inst = gais_table.instances_from_table(args.input, args.label_column, args.features)
    table, report = gais_table.run(inst, args.variant, args.reduction, args.scoring, args.seed,
                                   scale=not args.no_scale)
    params = {k: getattr(args, k) for k in ("input", "label_column", "features", "embeddings", "variant",
                                            "reduction", "scoring", "seed")}
    out = gais_table.write(table, report, args.out, params)
    print(f"GAIS-{args.variant} ({args.scoring}): kept {report['selected']:,} of {report['n']:,} "
          f"(reduction {report['achieved_reduction']:.3f}) in {report['timings'].get('total_s', 0):.1f} s")
    print(f"wrote {out}")
    return 0
