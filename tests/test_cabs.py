"""CABS selection (pipeline/select/cabs.py) and batch metrics, checked against naive re-scans."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
from oracles.cabs_naive import (
    naive_dm_paper,
    naive_dm_reference,
    naive_fm,
    naive_reference_targets,
    rescan_dm_paper_numpy,
)

import pipeline.select.cabs as cabs_mod
from pipeline.select.batch_metrics import (
    batch_report,
    compare_to_iid,
    concept_frequencies,
    format_reports,
    gini,
    long_tail_mask,
)
from pipeline.select.cabs import (
    ConceptTable,
    batch_size_for,
    cabs_dm,
    cabs_dm_python,
    cabs_fm,
    reference_targets,
    select_batch,
)


def random_rows(rng: np.random.Generator, n: int, vocab: int, lam: float, zipf: bool = False) -> list[list[int]]:
    p = None
    if zipf:
        p = 1.0 / np.arange(1, vocab + 1)
        p /= p.sum()
    return [rng.choice(vocab, size=rng.poisson(lam), p=p).tolist() for _ in range(n)]


def zipf_table(rng: np.random.Generator, n: int, vocab: int = 2000, lam: float = 3.0) -> ConceptTable:
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    lengths = rng.poisson(lam, size=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return ConceptTable(indptr, rng.choice(vocab, size=int(indptr[-1]), p=p), vocab)


# --- ConceptTable --------------------------------------------------------------------------------


def test_table_from_id_lists_and_distinct_view() -> None:
    t = ConceptTable.from_id_lists([[3, 1, 3], [], [2]], n_concepts=5)
    assert t.n_rows == 3 and t.n_concepts == 5
    assert t.indptr.tolist() == [0, 3, 3, 4]
    assert t.concept_ids.tolist() == [3, 1, 3, 2]
    assert t.instance_counts().tolist() == [3, 0, 1]
    assert t.distinct_indptr.tolist() == [0, 2, 2, 3]
    assert t.distinct_ids.tolist() == [1, 3, 2]
    assert t.distinct_counts.tolist() == [1, 2, 1]


def test_table_take_gathers_rows_in_order() -> None:
    rng = np.random.default_rng(0)
    rows = random_rows(rng, 50, 12, 3.0)
    t = ConceptTable.from_id_lists(rows, n_concepts=12)
    pick = rng.permutation(50)[:20]
    sub = t.take(pick)
    direct = ConceptTable.from_id_lists([rows[i] for i in pick], n_concepts=12)
    for name in ("indptr", "concept_ids", "distinct_indptr", "distinct_ids", "distinct_counts"):
        assert np.array_equal(getattr(sub, name), getattr(direct, name)), name


def test_table_from_names_with_and_without_vocabulary() -> None:
    t = ConceptTable.from_name_lists([["dog", "cat", "dog"], ["zebra"]])
    assert t.vocabulary == ("cat", "dog", "zebra")  # sorted: ids follow alphabetical order
    assert t.concept_ids.tolist() == [1, 0, 1, 2]
    t2 = ConceptTable.from_name_lists([["dog", "cat"]], vocabulary=["zebra", "dog", "cat"])
    assert t2.concept_ids.tolist() == [1, 2]
    assert t2.alphabetical_rank().tolist() == [2, 1, 0]
    t3 = ConceptTable.from_name_lists([["dog", "cat"]], vocabulary={"dog": 0, "cat": 1})
    assert t3.concept_ids.tolist() == [0, 1] and t3.vocabulary == ("dog", "cat")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ConceptTable.from_name_lists([["dog", "owl"]], vocabulary=["dog"])
    t4 = ConceptTable.from_name_lists([["dog", "owl"]], vocabulary=["dog"], unknown="skip")
    assert t4.concept_ids.tolist() == [0]


def test_table_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n_concepts"):
        ConceptTable(np.array([0, 2]), np.array([0, 7]), 5)
    with pytest.raises(ValueError, match="indptr ends"):
        ConceptTable(np.array([0, 3]), np.array([0, 1]), 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        ConceptTable(np.array([0, 2, 1, 2]), np.array([0, 1]), 5)
    t = ConceptTable.from_id_lists([[0], [1]])
    with pytest.raises(ValueError, match="batch size"):
        cabs_dm(t, 3)
    with pytest.raises(ValueError, match="batch size"):
        cabs_fm(t, 0)
    with pytest.raises(ValueError, match="unknown DM mode"):
        cabs_dm(t, 1, "greedy")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        t.take([0, 2])


def test_batch_size_for() -> None:
    assert batch_size_for(20_480, 0.8) == 4096
    assert batch_size_for(5_120, 0.8) == 1024
    assert batch_size_for(10, 0.0) == 10
    assert batch_size_for(3, 0.9) == 1  # never 0
    with pytest.raises(ValueError):
        batch_size_for(10, 1.0)


# --- CABS-FM -------------------------------------------------------------------------------------


def test_fm_stable_sort_keeps_superbatch_order_on_ties() -> None:
    t = ConceptTable.from_id_lists([[1], [1, 2], [], [3, 3], [4], [5, 5]])
    r = cabs_fm(t, 4)
    # counts 1, 2, 0, 2, 1, 2: the three 2s in order, then the first 1
    assert r.indices.tolist() == [1, 3, 5, 0]
    assert r.gains.tolist() == [2.0, 2.0, 2.0, 1.0]
    assert r.mode == "fm" and r.zero_gain_count == 0
    assert cabs_fm(t, 6).zero_gain_count == 1


@pytest.mark.parametrize("seed", range(5))
def test_fm_matches_naive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, 200, 30, 2.0)
    for b in (1, 37, 200):
        assert cabs_fm(ConceptTable.from_id_lists(rows, 30), b).indices.tolist() == naive_fm(rows, b)


# --- CABS-DM, paper mode -------------------------------------------------------------------------


def test_dm_paper_hand_example() -> None:
    # concepts: a=0 in samples 0,1; b=1 in 1,2; c=2 only in 3; sample 4 empty. K = 3, b = 3 -> t = 1
    t = ConceptTable.from_id_lists([[0], [0, 1, 1], [1], [2], []], n_concepts=3)
    r = cabs_dm(t, 3)
    # first: sample 3 (1 + 1/1 = 2.0); then 0 (1.5), 1 ((1.5 + 1.5) / 2 = 1.5), 2 (1.5): tie -> 0
    # then a is at target: 1 -> (0 + 1.5) / 2 = 0.75, 2 -> 1.5: pick 2
    assert r.indices.tolist() == [3, 0, 2]
    assert r.gains.tolist() == [2.0, 1.5, 1.5]
    assert r.target == 1.0 and r.n_distinct_concepts == 3 and r.zero_gain_count == 0
    # b = 5 > K: t = 5/3 (real division); remaining picks 1 then the empty sample
    r5 = cabs_dm(t, 5)
    assert r5.target == pytest.approx(5 / 3)
    assert sorted(r5.indices.tolist()) == [0, 1, 2, 3, 4]
    assert r5.indices.tolist()[-1] == 4 and r5.gains[-1] == 0.0


def _dm_cases() -> list[tuple[int, list[list[int]], int]]:
    rng = np.random.default_rng(1234)
    cases = []
    for case in range(60):
        n = int(rng.integers(1, 70))
        vocab = int(rng.integers(1, 25))  # small vocabularies: many exact ties
        rows = random_rows(rng, n, vocab, float(rng.uniform(0.0, 4.0)), zipf=bool(case % 2))
        if case % 5 == 0 and n > 3:
            for i in rng.choice(n, size=n // 3, replace=False):
                rows[i] = []  # plenty of empty concept lists
        b = n if case % 7 == 0 else int(rng.integers(1, n + 1))  # include b = B
        cases.append((case, rows, b))
    return cases


ENGINES = {
    "compiled": None,  # cabs_dm: the compiled greedy
    # cabs_dm_python, the previous pure-Python greedy, forced down each of its re-scoring paths
    "python": {},
    "python-blocks": {"_SINGLE_MAX": 0, "_BLOCK_MAX": 3, "_REBUILD_FRACTION": None},  # tiny numpy blocks only
    "python-singles": {"_SINGLE_MAX": 10**9, "_BLOCK_MAX": 10**9, "_REBUILD_FRACTION": None},  # Python only
    "python-rebuilds": {"_SINGLE_MAX": 2, "_BLOCK_MAX": 5, "_REBUILD_FRACTION": 0.05},  # full rebuilds often
}


def use_engine(name: str, monkeypatch: pytest.MonkeyPatch):
    """The DM function of engine ``name`` (tuning constants patched for the Python ones)."""
    if ENGINES[name] is None:
        return cabs_dm
    for attr, value in ENGINES[name].items():
        monkeypatch.setattr(cabs_mod, attr, value)
    return cabs_dm_python


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dm_paper_matches_naive_rescan(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = use_engine(engine, monkeypatch)
    n_targets_above_one = 0
    for case, rows, b in _dm_cases():
        r = dm(ConceptTable.from_id_lists(rows, n_concepts=25), b)
        picks, gains = naive_dm_paper(rows, b)
        assert r.indices.tolist() == picks, f"case {case}"
        assert r.gains.tolist() == gains, f"case {case}"
        assert r.zero_gain_count == sum(g == 0.0 for g in gains)
        n_targets_above_one += r.target > 1.0
    assert n_targets_above_one >= 5  # b > #distinct concepts is exercised


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dm_paper_matches_vectorised_rescan_on_zipf(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = use_engine(engine, monkeypatch)
    rng = np.random.default_rng(7)
    rows = random_rows(rng, 1500, 800, 3.0, zipf=True)
    t = ConceptTable.from_id_lists(rows, n_concepts=800)
    for b in (300, 1400):
        assert dm(t, b).indices.tolist() == rescan_dm_paper_numpy(rows, b)
    small = rows[:700]
    ref = dm(ConceptTable.from_id_lists(small, n_concepts=800), 140, "reference", seed=0)
    assert ref.indices.tolist() == naive_dm_reference(small, 140, 10, seed=0)[0]


def test_dm_paper_gains_never_increase_and_batch_is_full() -> None:
    rng = np.random.default_rng(3)
    t = zipf_table(rng, 3000)
    r = cabs_dm(t, 2900)
    assert len(r) == 2900 and np.unique(r.indices).size == 2900
    assert np.all(np.diff(r.gains) <= 0)
    assert r.zero_gain_count > 0  # the tail of a near-full batch adds nothing...
    assert r.gains[-1] == 0.0  # ...and is still filled to exactly b


def test_dm_paper_all_empty_superbatch() -> None:
    r = cabs_dm(ConceptTable.from_id_lists([[], [], [], []], n_concepts=3), 2)
    assert r.indices.tolist() == [0, 1] and r.zero_gain_count == 2 and r.n_distinct_concepts == 0


# --- CABS-DM, reference mode ---------------------------------------------------------------------


def test_reference_targets_alphabetical_remainder() -> None:
    names = ["pear", "apple", "zebra", "mango"]
    rows = [[0, 1], [2], [3, 0], [1]]
    t = ConceptTable.from_name_lists([[names[c] for c in r] for r in rows], vocabulary=names)
    # b = 6, K = 4: base 1, remainder 2 -> the first two alphabetically (apple, mango) get 2
    assert reference_targets(t, 6).tolist() == [1, 2, 1, 2]
    assert dict(enumerate(reference_targets(t, 6).tolist())) == naive_reference_targets(rows, 6, 10, names)
    rng = np.random.default_rng(5)
    for _ in range(30):
        rows = random_rows(rng, int(rng.integers(1, 40)), 15, 2.5)
        if not any(rows):
            continue
        b, cap = int(rng.integers(1, 80)), int(rng.integers(1, 6))
        got = reference_targets(ConceptTable.from_id_lists(rows, 15), b, cap)
        want = naive_reference_targets(rows, b, cap)
        assert {c: int(got[c]) for c in want} == want
        assert all(got[c] == 0 for c in range(15) if c not in want)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dm_reference_matches_naive(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = use_engine(engine, monkeypatch)
    rng = np.random.default_rng(99)
    filled = padded = 0
    for case, rows, b in _dm_cases():
        cap = int(rng.integers(1, 5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = dm(ConceptTable.from_id_lists(rows, n_concepts=25), b, "reference", cap=cap, seed=case)
        picks, gains, n_fill, n_pad = naive_dm_reference(rows, b, cap, seed=case)
        assert r.indices.tolist() == picks, f"case {case}"
        n_greedy = len(gains)
        assert r.gains[:n_greedy].tolist() == gains
        assert np.isnan(r.gains[n_greedy:]).all()
        assert (r.random_fill_count, r.padded_count) == (n_fill, n_pad)
        filled += n_fill > 0
        padded += n_pad > 0
    assert filled and padded  # both shortfall paths are exercised


def test_dm_reference_respects_cap_in_greedy_picks() -> None:
    rng = np.random.default_rng(11)
    rows = random_rows(rng, 800, 40, 3.0, zipf=True)
    cap = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = cabs_dm(ConceptTable.from_id_lists(rows, 40), 300, "reference", cap=cap, seed=0)
    n_greedy = 300 - r.random_fill_count - r.padded_count
    count: Counter = Counter()
    for i in r.indices[:n_greedy].tolist():
        assert all(count[c] < cap for c in rows[i]), "picked a sample whose concept had reached the cap"
        count.update(rows[i])
    for i in r.indices[n_greedy:n_greedy + r.random_fill_count].tolist():  # random fill: valid samples only
        assert all(count[c] < cap for c in rows[i])


def test_dm_reference_pads_and_says_so() -> None:
    rows = [[0, 1], [0], [0, 2], [0], [0, 3], [0]]  # every sample contains concept 0
    t = ConceptTable.from_id_lists(rows)
    with pytest.warns(RuntimeWarning, match="padded the batch with 3"):
        r = cabs_dm(t, 5, "reference", cap=2, seed=0)
    assert len(r) == 5 and np.unique(r.indices).size == 5
    assert (r.random_fill_count, r.padded_count) == (0, 3)
    assert r.mode == "dm-reference"


def test_dm_reference_random_fill_is_seeded() -> None:
    rng = np.random.default_rng(2)
    rows = random_rows(rng, 300, 6, 1.0)
    t = ConceptTable.from_id_lists(rows, 6)
    a = cabs_dm(t, 100, "reference", cap=3, seed=0)
    assert a.random_fill_count > 0
    assert np.array_equal(a.indices, cabs_dm(t, 100, "reference", cap=3, seed=0).indices)
    assert not np.array_equal(a.indices, cabs_dm(t, 100, "reference", cap=3, seed=1).indices)
    g = cabs_dm(t, 100, "reference", cap=3, seed=np.random.default_rng(0))
    assert np.array_equal(g.indices, a.indices)  # a Generator seeded alike draws alike


@pytest.mark.parametrize("seed", range(4))
def test_never_short_in_any_mode(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(10):
        n = int(rng.integers(1, 120))
        rows = random_rows(rng, n, int(rng.integers(1, 10)), float(rng.uniform(0, 3)))
        t = ConceptTable.from_id_lists(rows, 10)
        b = int(rng.integers(1, n + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            results = [select_batch(t, b, "fm"), select_batch(t, b, "dm"),
                       select_batch(t, b, "dm", "reference", cap=1, seed=seed)]
        for r in results:
            assert len(r) == b and np.unique(r.indices).size == b
            assert r.indices.min() >= 0 and r.indices.max() < n


# --- the compiled greedy against the previous Python greedy --------------------------------------


def assert_same_batch(fast, previous) -> None:
    assert fast.indices.tolist() == previous.indices.tolist()
    # NaN where both fill; equal here bit for bit, a last-bit tolerance keeps it portable across CPUs
    np.testing.assert_allclose(fast.gains, previous.gains, rtol=1e-12, atol=0, equal_nan=True)
    assert (fast.zero_gain_count, fast.random_fill_count, fast.padded_count) == (
        previous.zero_gain_count, previous.random_fill_count, previous.padded_count)
    assert (fast.n_distinct_concepts, fast.target, fast.mode) == (
        previous.n_distinct_concepts, previous.target, previous.mode)


@pytest.mark.parametrize("seed", range(3))
def test_compiled_dm_equals_python_on_zipf_superbatches(seed: int) -> None:
    # Real-shaped: Poisson(3) instances from a Zipf vocabulary (the benchmark's shape, smaller),
    # b at the paper's 0.2 B, at t = 1 and at t > 1, both modes, caps that force fill and padding.
    rng = np.random.default_rng(seed)
    pool = zipf_table(rng, 20_000, vocab=3000)
    for big_b, b in ((5120, 1024), (2000, 1900), (600, 120)):
        sb = pool.take(rng.choice(pool.n_rows, big_b, replace=False))
        assert_same_batch(cabs_dm(sb, b), cabs_dm_python(sb, b))
        for cap in (10, 2, 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fast = cabs_dm(sb, b, "reference", cap=cap, seed=seed)
                previous = cabs_dm_python(sb, b, "reference", cap=cap, seed=seed)
            assert_same_batch(fast, previous)


def test_compiled_dm_equals_python_with_many_ties() -> None:
    # Tiny vocabularies and repeated rows: equal gains everywhere, decided by position alone.
    rng = np.random.default_rng(17)
    for _ in range(40):
        n = int(rng.integers(1, 400))
        vocab = int(rng.integers(1, 6))
        base = random_rows(rng, max(1, n // 8), vocab, float(rng.uniform(0.0, 3.0)))
        rows = [list(base[int(j)]) for j in rng.integers(0, len(base), n)]
        t = ConceptTable.from_id_lists(rows, n_concepts=vocab)
        b = int(rng.integers(1, n + 1))
        assert_same_batch(cabs_dm(t, b), cabs_dm_python(t, b))
        cap = int(rng.integers(1, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert_same_batch(cabs_dm(t, b, "reference", cap=cap, seed=1),
                              cabs_dm_python(t, b, "reference", cap=cap, seed=1))
    same = ConceptTable.from_id_lists([[0, 1]] * 50, n_concepts=2)  # every gain equal
    assert cabs_dm(same, 10).indices.tolist() == list(range(10))


def test_cap_must_be_a_positive_integer() -> None:
    t = ConceptTable.from_id_lists([[0], [1]])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="cap must be an integer >= 1"):
            cabs_dm(t, 1, "reference", cap=bad)


# --- batch metrics -------------------------------------------------------------------------------


def test_metric_values_on_a_known_batch() -> None:
    t = ConceptTable.from_id_lists([[0, 0], [1], [2, 3]], n_concepts=5)
    rep = batch_report(t, tail=np.array([False, False, True, True, False]))
    assert rep.n_samples == 3 and rep.n_instances == 5 and rep.distinct_concepts == 4
    p = np.array([2, 1, 1, 1]) / 5
    assert rep.entropy_bits == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert rep.normalised_entropy == pytest.approx(rep.entropy_bits / 2.0)
    assert rep.mean_instances == pytest.approx(5 / 3)
    assert rep.tail_instance_share == pytest.approx(2 / 5) and rep.tail_distinct == 2
    assert rep.gini == pytest.approx(gini(np.array([2, 1, 1, 1])))
    assert gini(np.array([3, 3, 3])) == 0.0
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)
    mask = long_tail_mask(np.array([0, 10, 1, 1, 5]))  # median of (10, 1, 1, 5) = 3
    assert mask.tolist() == [False, False, True, True, False]
    assert concept_frequencies(t).tolist() == [2, 1, 1, 1, 0]


def test_dm_batches_are_more_diverse_than_iid_on_zipf_data() -> None:
    rng = np.random.default_rng(21)
    sb = zipf_table(rng, 5000, vocab=3000)
    b = batch_size_for(5000, 0.8)
    dm = compare_to_iid(sb, cabs_dm(sb, b).indices, n_draws=8, seed=1)
    assert dm.selected.distinct_concepts > 1.3 * dm.iid_mean["distinct_concepts"]
    assert dm.selected.entropy_bits > dm.iid_mean["entropy_bits"] + 3 * dm.iid_std["entropy_bits"]
    assert dm.selected.gini < dm.iid_mean["gini"]
    assert dm.selected.tail_instance_share > dm.iid_mean["tail_instance_share"]
    fm = compare_to_iid(sb, cabs_fm(sb, b).indices, n_draws=8, seed=1)
    assert fm.selected.mean_instances > 1.5 * fm.iid_mean["mean_instances"]
    assert dm.ratio("distinct_concepts") > 1.3
    text = format_reports({"cabs-dm": dm.selected, "iid": dm.iid_mean})
    assert "cabs-dm" in text and "distinct_concepts" in text


@pytest.mark.shared_data
def test_nlvr_concepts_dm_vs_iid(shared_data) -> None:
    import json

    path = shared_data / "image_text" / "nlvr_dev" / "dev.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = []
    with path.open() as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append([name for box in rec["structured_rep"] for obj in box
                         for name in (obj["type"], f"{obj['color'].lower()} {obj['type']}")])
    table = ConceptTable.from_name_lists(rows)
    b = batch_size_for(table.n_rows, 0.8)
    cmp = compare_to_iid(table, cabs_dm(table, b).indices, n_draws=10, seed=0)
    assert cmp.selected.normalised_entropy > cmp.iid_mean["normalised_entropy"]
    assert math.isfinite(cmp.selected.gini)


# --- batch size, cap and IID draws through the schedule, the planner and the CLI -----------------


def test_power_of_two_batch_size() -> None:
    assert batch_size_for(20_480, 0.8, power_of_two=True) == 4096 == batch_size_for(20_480, 0.8)
    assert batch_size_for(5_120, 0.8, power_of_two=True) == 1024
    assert batch_size_for(10_000, 0.8) == 2000 and batch_size_for(10_000, 0.8, power_of_two=True) == 1024
    assert batch_size_for(3, 0.8, power_of_two=True) == 1
    assert all(batch_size_for(B, 0.7, power_of_two=True) & (batch_size_for(B, 0.7, power_of_two=True) - 1) == 0
               for B in range(1, 3000, 37))


def test_schedule_power_of_two_and_cap() -> None:
    from pipeline.select.cabs_schedule import CabsSchedule, plan_batches

    rng = np.random.default_rng(4)
    rows = random_rows(rng, 1000, 30, 2.0, zipf=True)
    sched = CabsSchedule(rows, 300, 0.8, "dm", "reference", seed=1, drop_last=False, cap=3, power_of_two=True)
    assert sched.batch_size == 32  # round(0.2 x 300) = 60 -> 32
    assert len(sched.step(0).batch) == 32
    assert len(sched.step(3).batch) == 16  # the last, short super-batch of 100: 20 -> 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        capped = list(plan_batches(rows, "dm", 0.8, 300, 1, 1, dm_mode="reference", cap=2))
        loose = list(plan_batches(rows, "dm", 0.8, 300, 1, 1, dm_mode="reference", cap=50))
    assert len(capped) == len(loose) == 60 and capped != loose
    with pytest.raises(ValueError, match="cap must be an integer >= 1"):
        CabsSchedule(rows, 300, cap=0)


def test_cli_cap_power_of_two_and_iid_draws(tmp_path, capsys) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import main

    rng = np.random.default_rng(0)
    vocab = [f"c{i}" for i in range(12)]
    weights = 1.0 / np.arange(1, 13)
    concepts = [list(rng.choice(vocab, size=rng.poisson(3), p=weights / weights.sum())) for _ in range(400)]
    src = tmp_path / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(400)], "concepts": concepts}), src)
    out = tmp_path / "plan.parquet"
    args = ["select", "cabs", "--input", str(src), "--dm-mode", "reference", "--superbatch", "200",
            "--steps", "2", "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main([*args, "--cap", "2", "--power-of-two", "--iid-draws", "7"]) == 0
        report = json.loads(out.with_suffix(".report.json").read_text())["report"]
        assert report["batch"] == 32 and report["iid_draws"] == 7  # 40 -> 32
        assert report["iid_std"]["distinct_concepts"] > 0.0
        text = capsys.readouterr().out
        assert "IID std" in text and "7 draws per step" in text
        capped = pq.read_table(out).column("sample_id").to_pylist()
        assert main([*args, "--cap", "40"]) == 0
        report = json.loads(out.with_suffix(".report.json").read_text())["report"]
        assert report["batch"] == 40 and report["iid_draws"] == 5
        assert pq.read_table(out).column("sample_id").to_pylist()[:32] != capped
    assert main([*args, "--cap", "0"]) == 2
    assert main([*args, "--iid-draws", "0"]) == 2
    assert "iid_draws" in capsys.readouterr().err
