"""One encoder pass per conversation vs one pass per consumer: work, time and agreement.

Before, three stages each encoded their own text of every sample with MiniLM: the embedding
stage the conversation text, the tagger the user text (head and tail), the quality scorer each
round's instruction and response (400 characters each). Now the embedding stage encodes the
conversation text once and pools it per span (:mod:`pipeline.embed.spans`); the tagger and the
scorer read the stored user / answer vectors. This script measures, on real conversations from
../shared/data, in one run:

* encoder work: tokens encoded and wall / CPU seconds, separate passes vs one pass;
* tag agreement: Jaccard of the tag sets, top tag equal, per sample;
* quality agreement: mean |score difference| and Spearman correlation of the DEITA-scale score.

    python benchmarks/one_pass.py [--n 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instructions"
FILES = ["self_instruct_t0_train.jsonl.gz", "gpteacher_codegen.json.gz", "gpteacher_roleplay.json.gz",
         "gpteacher_toolformer.json.gz", "gsm8k_train.jsonl.gz", "self_instruct_user_oriented_predictions.jsonl.gz",
         "sharegpt_dummy_conversations.json.gz"]


def load(n: int, seed: int) -> list[list[dict]]:
    from pipeline.io.instruction_formats import normalise
    from pipeline.io.rejects import RecordRejected

    rng = random.Random(seed)
    per_file = -(-n // len(FILES))
    out = []
    for name in FILES:
        with gzip.open(DATA / name, "rt", encoding="utf-8") as fh:
            records = json.load(fh) if name.endswith(".json.gz") else [json.loads(line) for line in fh if line.strip()]
        for record in rng.sample(records, min(per_file, len(records))):
            try:
                out.append(normalise(record).messages)
            except RecordRejected:
                pass
    return out[:n]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pipeline.annotate.quality import (
        OfflineQualityScorer,
        _clip_for_embedding,
        conversation_rounds,
        on_topic_from_spans,
    )
    from pipeline.annotate.tags import (
        OfflineTagger,
        TaggerConfig,
        head_and_tail,
        user_text,
    )
    from pipeline.embed.sentence import embed_texts, shared_sentence_model
    from pipeline.embed.spans import conversation_spans, encode_spans, encode_texts
    from pipeline.embed.tiers import load_token_encoder

    convs = load(args.n, args.seed)
    model = shared_sentence_model(None, "cpu")
    # fp32 compute, as the separate passes (embed_texts) use: the comparison is one pass vs several, not precision
    encoder = load_token_encoder("fp32", None, "cpu", precision="fp32")
    embed = lambda texts: embed_texts(model, texts)  # noqa: E731
    tok = model.tokenizer

    def n_tokens(texts: list[str]) -> int:
        return sum(min(len(ids), 256) for ids in tok(texts, add_special_tokens=True)["input_ids"])

    # --- before: three consumers, three passes (each deduplicating its own texts, as they did)
    items = [conversation_spans(m, 1024) for m in convs]
    c = TaggerConfig()
    tag_texts = list(dict.fromkeys(head_and_tail(user_text(m), c.head_chars, c.tail_chars) or " " for m in convs))
    q_texts = []
    for m in convs:
        for r in conversation_rounds(m):
            if r.response is not None and r.response.strip():
                q_texts += [_clip_for_embedding(r.instruction, 400), _clip_for_embedding(r.response, 400)]
    q_texts = list(dict.fromkeys(q_texts))
    conv_texts = [i.text for i in items]
    before_tokens = n_tokens(conv_texts) + n_tokens(tag_texts) + n_tokens(q_texts)
    _, w_before, c_before = timed(lambda: (embed(conv_texts), embed(tag_texts), embed(q_texts)))

    # --- after: one pass, pooled per span
    pooled, w_after, c_after = timed(lambda: encode_spans(encoder, items))
    after_tokens = n_tokens(conv_texts)

    # --- tags: separate user encodings vs stored user spans (same vocabulary vectors)
    old_tagger = OfflineTagger(embedder=embed)
    new_tagger = OfflineTagger(embedder=lambda t: encode_texts(encoder, t))
    old_tags = old_tagger.tag_many(convs)
    new_tags = new_tagger.tag_many(convs, pooled["user"])
    jacc, top1 = [], []
    for a, b in zip(old_tags, new_tags):
        sa, sb = {p.tag for p in a}, {p.tag for p in b}
        jacc.append(len(sa & sb) / max(len(sa | sb), 1))
        top1.append(bool(a and b and a[0].tag == b[0].tag))

    # --- quality: per-round encodings vs the stored user/answer cosine
    old_q = np.array([r.score for r in OfflineQualityScorer(embedder=embed).score_many(convs)])
    on_topic = on_topic_from_spans(np.einsum("ij,ij->i", pooled["user"], pooled["answer"]))
    new_q = np.array([r.score for r in OfflineQualityScorer(embedder=False).score_many(convs, on_topic)])

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"conversations: {len(convs)} (seed {args.seed}; files: {', '.join(FILES)})")
    print(f"{'':28}{'separate passes':>18}{'one pass':>12}{'ratio':>8}")
    print(f"{'tokens encoded':28}{before_tokens:>18,}{after_tokens:>12,}{after_tokens / before_tokens:>8.2f}")
    print(f"{'encoder wall s':28}{w_before:>18.1f}{w_after:>12.1f}{w_after / w_before:>8.2f}")
    print(f"{'encoder CPU s':28}{c_before:>18.1f}{c_after:>12.1f}{c_after / c_before:>8.2f}")
    print(f"tags: mean Jaccard {np.mean(jacc):.3f}, same top tag {np.mean(top1):.3f}, "
          f"identical sets {np.mean([j == 1.0 for j in jacc]):.3f}")
    print(f"quality score: mean |diff| {np.mean(np.abs(old_q - new_q)):.3f} (scale 1-6 x 1-6), "
          f"Spearman {spearman(old_q, new_q):.3f}; on-topic absent (no answer) {np.isnan(on_topic).mean():.3f}")
    print(f"peak RSS {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
