"""Tag-rule matching: the old one-regex-after-another loop against the literal pre-filter.

    python benchmarks/tag_rules.py               # ~3,000 real conversations
    python benchmarks/tag_rules.py --quick       # ~600

Real conversations from ../shared/data/instructions, mixed from several files (P3/T0 prompts,
GPTeacher code, role-play and tool use, GSM8K, ShareGPT), each normalised with the ingest
layouts (pipeline.io.instruction_formats.normalise) and clipped exactly as
``OfflineTagger.rule_matches`` clips them. Both methods see the same texts; the run asserts
that every conversation gets identical (added, boosted) sets, then prints ms/sample (process CPU
time, robust to other load on a shared machine) per file and overall, and the ratio. The
one-off compile of the matcher (regex analysis and the literal scanner) is timed separately.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.annotate.tag_rules import CompiledRules, reference_matches  # noqa: E402
from pipeline.annotate.tags import (  # noqa: E402
    TaggerConfig,
    _clip_for_rules,
    assistant_text,
    load_tag_vocabulary,
    user_text,
)
from pipeline.io.instruction_formats import normalise  # noqa: E402
from pipeline.io.rejects import RecordRejected  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "instructions"
# file -> share of the sample (the real pool is mostly P3/T0 prompts)
MIX = {
    "self_instruct_t0_train.jsonl.gz": 0.45,
    "gpteacher_codegen.json.gz": 0.1,
    "gpteacher_roleplay.json.gz": 0.1,
    "gpteacher_toolformer.json.gz": 0.1,
    "gsm8k_train.jsonl.gz": 0.15,
    "sharegpt_dummy_conversations.json.gz": 0.05,
    "self_instruct_user_oriented_predictions.jsonl.gz": 0.05,
}


def read_conversations(path: Path, n: int, seed: int = 0, max_records: int = 20_000) -> list[list[dict]]:
    """Up to ``n`` conversations, a seeded random choice among the file's first ``max_records``."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        if path.name.endswith(".jsonl.gz"):
            records = []
            for line in f:
                if line.strip():
                    records.append(json.loads(line))
                if len(records) >= max_records:
                    break
        else:
            records = json.load(f)[:max_records]
    random.Random(seed).shuffle(records)
    out: list[list[dict]] = []
    for r in records:
        try:
            out.append(normalise(r).messages)
        except RecordRejected:  # a record no layout reads is not part of the sample
            pass
        if len(out) >= n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="conversations in all")
    ap.add_argument("--quick", action="store_true", help="~600 conversations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = 600 if args.quick else args.n
    if not DATA.is_dir():
        print(f"real data folder {DATA} is absent; nothing to measure")
        return 1

    vocab = load_tag_vocabulary()
    pairs = [(i, r) for i, e in enumerate(vocab.entries) for r in e.rules]
    limit = TaggerConfig().rule_text_chars
    t0 = time.process_time()
    matcher = CompiledRules(pairs)
    _ = matcher.compiled
    build = time.process_time() - t0
    print(f"{len(pairs)} rules; {matcher.n_prefiltered} with a literal pre-filter, "
          f"{len(pairs) - matcher.n_prefiltered} always run; compile {build * 1000:.0f} ms (once per process)")

    total_old = total_new = 0.0
    total_n = 0
    cand = 0
    print(f"{'file':50s} {'n':>5s} {'chars':>6s} {'old ms':>8s} {'new ms':>8s} {'ratio':>6s} {'regexes run':>11s}")
    for name, share in MIX.items():
        path = DATA / name
        if not path.exists():
            continue
        convs = read_conversations(path, max(1, round(n * share)), args.seed)
        texts = [(_clip_for_rules(user_text(m), limit), _clip_for_rules(assistant_text(m), limit)) for m in convs]
        t0 = time.process_time()
        old = [reference_matches(pairs, u, r) for u, r in texts]
        t_old = time.process_time() - t0
        t0 = time.process_time()
        new = [matcher.matches(u, r) for u, r in texts]
        t_new = time.process_time() - t0
        bad = [k for k, (a, b) in enumerate(zip(old, new)) if a != b]
        assert not bad, f"{name}: {len(bad)} conversations differ, first #{bad[0]}: {old[bad[0]]} vs {new[bad[0]]}"
        runs = sum(len(matcher.candidates(u, r)) for u, r in texts)
        chars = sum(len(u) + len(r) for u, r in texts) / len(texts)
        print(f"{name:50s} {len(texts):5d} {chars:6.0f} {t_old * 1e3 / len(texts):8.2f} "
              f"{t_new * 1e3 / len(texts):8.2f} {t_old / t_new:6.1f} {runs / len(texts):11.1f}")
        total_old += t_old
        total_new += t_new
        total_n += len(texts)
        cand += runs
    print(f"{'all':50s} {total_n:5d} {'':6s} {total_old * 1e3 / total_n:8.2f} {total_new * 1e3 / total_n:8.2f} "
          f"{total_old / total_new:6.1f} {cand / total_n:11.1f}")
    print(f"identical (added, boosted) sets on all {total_n} conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
