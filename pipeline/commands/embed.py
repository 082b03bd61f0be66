"""thresher embed: the embedding Beam job (sentence-transformers text or open_clip image+caption)."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import add_catalog_argument
from pipeline.registry import EMBEDDERS, KINDS

NAME = "embed"
HELP = "embed a dataset's samples (a Beam job with RunInference; Beam pipeline options such as --runner pass through)"
PASSES_EXTRA_ARGS = True

DEFAULT_CLIP_MODEL = EMBEDDERS["clip"].param("model_name").default


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_catalog_argument(p)
    p.add_argument("--dataset", required=True, help="dataset partition to embed")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="sample kind (default: the one the dataset has): " + "; ".join(
                       f"{e.kind}: {e.name} ({e.help})" for e in EMBEDDERS.values()))
    p.add_argument("--model", default=None,
                   help="instruction: sentence-transformers folder or cached name (default: bundled "
                        "all-MiniLM-L6-v2); image_text: open_clip architecture (default: ViT-B-32; "
                        "thresher-tiny-vit is a tiny test config)")
    p.add_argument("--pretrained", default=None,
                   help="image_text: a pretrained tag already in the local cache (e.g. laion2b_s34b_b79k) "
                        "or a local checkpoint file; omitted = seeded random weights")
    p.add_argument("--name", default=None, help="embeddings folder name (default: derived from model/weights)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="inference batch size (default: 64 on a CPU; text on a GPU: what half its free memory holds)")
    p.add_argument("--max-chars", type=int, default=None,
                   help="instruction: characters of each conversation to embed (default: 4 x model max tokens)")
    p.add_argument("--tier", choices=EMBEDDERS["text"].param("tier").choice_values(), default="fp32",
                   help="instruction: fp32 (the model as it is), int8 (dynamic int8 ONNX graph of it) or static "
                        "(distilled static embeddings); see docs/embedding_tiers.md")
    p.add_argument("--precision", choices=EMBEDDERS["text"].param("precision").choice_values(), default="auto",
                   help="instruction, fp32 tier: compute precision (auto: fp16 on a GPU, bf16 on a CPU with "
                        "native bf16 (AVX512-BF16/AMX; ~1.5x, cosine >= 0.9999 to fp32), else fp32)")
    p.add_argument("--seed", type=int, default=0, help="image_text with random weights: init seed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--workers", type=int, default=1, help="in-process Beam workers (processes)")
    p.add_argument("--force", action="store_true", help="re-embed even if inputs, weights and settings are unchanged")


def detect_kind(catalog: str, dataset: str) -> str:
    from pipeline.io.catalog import Catalog

    cat = Catalog.at(catalog)
    present = [k for k in ("instruction", "image_text") if cat.samples_partition(k, dataset).is_dir()]
    if not present:
        raise FileNotFoundError(f"dataset {dataset!r} has no samples in {cat.root}; run `thresher ingest` first")
    if len(present) > 1:
        raise ValueError(f"dataset {dataset!r} has both instruction and image_text samples; pass --kind")
    return present[0]


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    kind = args.kind or detect_kind(args.catalog, args.dataset)
    entry = next(e for e in EMBEDDERS.values() if e.kind == kind)
    if kind == "instruction":
        if args.pretrained:
            raise ValueError("--pretrained applies to image_text (open_clip) models; for text pass --model FOLDER")
        given = {"model": args.model, "tier": args.tier, "precision": args.precision, "batch_size": args.batch_size,
                 "max_chars": args.max_chars,
                 "device": args.device, "name": args.name}
    else:
        model = args.model or DEFAULT_CLIP_MODEL
        if args.pretrained is None:
            print(f"thresher embed: warning: no --pretrained given, so {model} runs with random weights "
                  f"(seed {args.seed}); the vectors only exercise the plumbing. Pass a cached tag or a "
                  "checkpoint file for meaningful embeddings.", file=sys.stderr)
        given = {"model_name": model, "pretrained": args.pretrained, "batch_size": args.batch_size or 64,
                 "seed": args.seed, "device": args.device, "name": args.name}
    result = entry.load()(args.catalog, args.dataset, workers=args.workers, force=args.force, beam_args=beam_args,
                          **entry.validate(given))
    print(result.summary())
    return 0
