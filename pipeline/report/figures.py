"""Plotly figures of a :class:`ReportData`; each returns None when its data is absent."""

from __future__ import annotations

from collections import Counter

import numpy as np
import plotly.graph_objects as go

from pipeline.report.collect import TOP_LABELS, ReportData

BEFORE, AFTER, MUTED = "#9aa5b1", "#d9480f", "#ced4da"


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    kw.setdefault("height", 380)
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
                      legend=dict(orientation="h", y=-0.2), **kw)
    return fig


def _split(values: dict[str, float], selected: set[str]) -> tuple[list[float], list[float]]:
    return list(values.values()), [v for s, v in values.items() if s in selected]


def accounting(d: ReportData) -> go.Figure:
    a = d.accounting
    fig = go.Figure(go.Bar(x=["samples", "rejects", "duplicates"], y=[a["samples"], a["rejects"], a["duplicates"]],
                           marker_color=[BEFORE, AFTER, MUTED], text=[a["samples"], a["rejects"], a["duplicates"]],
                           textposition="auto"))
    return _layout(fig, f"Where the {a['rows_in']:,} input rows went", yaxis_title="rows")


def reject_reasons(d: ReportData) -> go.Figure | None:
    if not d.reject_reasons:
        return None
    reasons = d.reject_reasons[::-1]  # largest at the top of a horizontal bar chart
    fig = go.Figure(go.Bar(x=[n for _, n in reasons], y=[r for r, _ in reasons], orientation="h", marker_color=AFTER))
    return _layout(fig, "Reject reasons", xaxis_title="rows", height=max(260, 40 + 28 * len(reasons)))


def _before_after_histogram(values: dict[str, float], d: ReportData, title: str, axis: str) -> go.Figure | None:
    if not values:
        return None
    before, after = _split(values, d.selected)
    lo, hi = float(np.min(before)), float(np.max(before))
    bins = dict(start=lo, end=hi, size=(hi - lo) / 40 or 1.0)  # one binning for both, so bars line up
    fig = go.Figure(go.Histogram(x=before, name=f"dataset ({len(before):,})", histnorm="probability",
                                 marker_color=BEFORE, opacity=0.75, xbins=bins))
    if after:
        fig.add_trace(go.Histogram(x=after, name=f"selected ({len(after):,})", histnorm="probability",
                                   marker_color=AFTER, opacity=0.75, xbins=bins))
    return _layout(fig, title, barmode="overlay", xaxis_title=axis, yaxis_title="share of samples")


def lengths(d: ReportData) -> go.Figure | None:
    return _before_after_histogram(d.lengths, d, "Length before vs after selection", d.length_label)


def quality(d: ReportData) -> go.Figure | None:
    return _before_after_histogram(d.quality, d, "Quality score before vs after selection", "score")


def labels(d: ReportData) -> go.Figure | None:
    if not d.labels:
        return None
    before = Counter(t for tags in d.labels.values() for t in set(tags))
    top = [t for t, _ in sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_LABELS]]
    fig = go.Figure(go.Bar(x=top, y=[before[t] / len(d.labels) for t in top], name="dataset", marker_color=BEFORE))
    chosen = [tags for s, tags in d.labels.items() if s in d.selected]
    if chosen:
        after = Counter(t for tags in chosen for t in set(tags))
        fig.add_trace(go.Bar(x=top, y=[after[t] / len(chosen) for t in top], name="selected", marker_color=AFTER))
    return _layout(fig, f"Most frequent {d.label_kind}: share of samples carrying each", barmode="group",
                   yaxis_title="share of samples", xaxis_tickangle=-40)


def gain_curve(d: ReportData) -> go.Figure | None:
    if not d.gain_curve:
        return None
    fig = go.Figure(go.Scatter(x=np.arange(1, len(d.gain_curve) + 1), y=d.gain_curve, mode="lines",
                               line_color=AFTER, name="gain"))
    return _layout(fig, "Information gain of each pick (in pick order)", xaxis_title="pick", yaxis_title="gain")


def information_vs_random(d: ReportData) -> go.Figure | None:
    r = d.selection_report
    if "information" not in r or "random_information_mean" not in r:
        return None
    fig = go.Figure(go.Bar(x=["selected", "random subsets"], y=[r["information"], r["random_information_mean"]],
                           error_y=dict(type="data", array=[0, r.get("random_information_std", 0)]),
                           marker_color=[AFTER, BEFORE]))
    return _layout(fig, f"E(D) of the {r.get('budget', len(d.selected))} picks vs random subsets of the same size",
                   yaxis_title="E(D)")


def cabs_steps(d: ReportData) -> go.Figure | None:
    if not d.cabs_steps:
        return None
    steps = [s["step"] for s in d.cabs_steps]
    fig = go.Figure(go.Scatter(x=steps, y=[s["cabs_distinct"] for s in d.cabs_steps], name="CABS batch",
                               mode="lines+markers", line_color=AFTER))
    fig.add_trace(go.Scatter(x=steps, y=[s["iid_distinct"] for s in d.cabs_steps], name="IID batches (mean ± sd)",
                             mode="lines+markers", line_color=BEFORE,
                             error_y=dict(type="data", array=[s["iid_distinct_std"] for s in d.cabs_steps])))
    return _layout(fig, "Distinct concepts per batch: CABS vs IID", xaxis_title="step", yaxis_title="distinct concepts",
                   xaxis_dtick=1)


def embedding_map(d: ReportData) -> go.Figure | None:
    if not len(d.map_ids):
        return None
    chosen = np.array([s in d.selected for s in d.map_ids])
    fig = go.Figure(go.Scatter(x=d.map_xy[~chosen, 0], y=d.map_xy[~chosen, 1], mode="markers", name="not selected",
                                 marker=dict(color=MUTED, size=4)))
    if chosen.any():
        fig.add_trace(go.Scatter(x=d.map_xy[chosen, 0], y=d.map_xy[chosen, 1], mode="markers", name="selected",
                                   marker=dict(color=AFTER, size=6)))
    return _layout(fig, f"Embedding map ({d.embedding_model}, first two principal components)", height=520,
                   xaxis_title="PC 1", yaxis_title="PC 2")


ALL = (accounting, reject_reasons, lengths, quality, labels, gain_curve, information_vs_random, cabs_steps,
       embedding_map)
