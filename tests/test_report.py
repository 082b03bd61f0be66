"""thresher report: a self-contained HTML page, checked in a real headless Chromium when there is one."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from flows.ingest import IngestSpec
from pipeline.cli import main
from pipeline.report import build_report, collect

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_data):
    """One catalog with a MIG selection over instructions and a CABS plan over image-text pairs."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.curate_image_text import curate_image_text
    from flows.curate_instructions import curate_instructions
    from pipeline.embed.clip import TINY_MODEL, register_tiny_config

    from prefect.client.orchestration import get_client

    root = tmp_path_factory.mktemp("report") / "cat"
    register_tiny_config()
    with prefect_test_harness(server_startup_timeout=120):
        curate_instructions(IngestSpec("small", [str(demo_data / "instructions" / "gsm8k_train.jsonl.gz"),
                                                 str(demo_data / "instructions" / "gpteacher_roleplay.json.gz")]),
                            str(root), budget=20, name="small20")
        curate_image_text(IngestSpec("nlvr", [str(demo_data / "image_text" / "nlvr_dev")], kind="image_text",
                                     container="nlvr"),
                          str(root), model_name=TINY_MODEL, superbatch=50, filter_ratio=0.8, steps=3)
        with get_client(sync_client=True) as client:
            ARTIFACTS.extend(client.read_artifacts())
    return root


ARTIFACTS: list = []  # the flow runs' artifacts, read while the fixture's Prefect API was up


def _selection_named(root, prefix: str) -> str:
    names = {p.name.split(".")[0] for p in (root / "selections").iterdir()}
    return sorted(n for n in names if n.startswith(prefix))[0]


def test_report_data_follows_the_catalog(catalog):
    d = collect(catalog, "small", "small20")
    assert d.kind == "instruction" and d.n_samples == 210 and len(d.selected) == 20
    assert d.accounting["rows_in"] == d.n_samples + d.accounting["rejects"] + d.accounting["duplicates"]
    assert len(d.gain_curve) == 20 and d.gain_curve[0] >= d.gain_curve[-1]
    assert d.selection_report["information"] > d.selection_report["random_information_mean"]
    assert set(d.quality) <= set(d.lengths) and len(d.quality) == 210 and d.labels
    assert d.map_xy.shape == (210, 2) and np.isfinite(d.map_xy).all()
    assert set(d.map_ids) == set(d.lengths) and d.selected <= set(d.map_ids)


def test_image_report_compares_cabs_with_iid(catalog):
    d = collect(catalog, "nlvr", _selection_named(catalog, "nlvr_cabs"))
    assert d.kind == "image_text" and d.label_kind == "concepts"
    assert [s["step"] for s in d.cabs_steps] == [0, 1, 2]
    assert all(s["cabs_distinct"] > 0 and s["iid_distinct"] > 0 for s in d.cabs_steps)


def test_flows_write_the_report_and_attach_its_summary(catalog):
    assert (catalog / "reports" / "small--small20.html").is_file()
    summaries = {a.key: a.data for a in ARTIFACTS if a.type == "markdown"}
    assert "report-small-small20" in summaries and "| selected | 20 (9.5%) |" in summaries["report-small-small20"]
    assert any(key.startswith("report-nlvr-nlvr-cabs") for key in summaries)


def test_unchanged_inputs_skip_and_changed_ones_redraw(catalog, tmp_path):
    out = tmp_path / "r.html"
    assert build_report(catalog, "small", "small20", out, force=False)[1] is not None
    assert build_report(catalog, "small", "small20", out, force=False)[1] is None  # same inputs: kept
    picks = catalog / "selections" / "small20" / "picks.parquet"
    picks.touch()  # a recommitted selection changes the inputs' fingerprint
    assert build_report(catalog, "small", "small20", out, force=False)[1] is not None


def test_page_is_self_contained(catalog, tmp_path):
    out, _ = build_report(catalog, "nlvr", _selection_named(catalog, "nlvr_cabs"), tmp_path / "r.html")
    page = out.read_text()
    # nothing is fetched when the page is opened: no external scripts, styles or images
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", page)
    assert "Distinct concepts per batch" in page and "Embedding map" in page
    if "Near-duplicate groups" in page:
        assert "src='data:image/jpeg;base64," in page


def test_cli_writes_into_the_catalog_and_explains_bad_names(catalog, capsys):
    assert main(["report", "--catalog", str(catalog), "--dataset", "small", "--selection", "small20"]) == 0
    assert (catalog / "reports" / "small--small20.html").is_file()
    with pytest.raises(ValueError, match="datasets there: .*small"):
        collect(catalog, "smal")
    with pytest.raises(ValueError, match="no selection or curated set named 'nope'"):
        collect(catalog, "small", "nope")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_renders_in_headless_chromium_without_console_errors(catalog, tmp_path):
    out, _ = build_report(catalog, "small", "small20", tmp_path / "r.html")
    figures = out.read_text().count("<div class='figure'>")
    assert figures >= 7  # accounting, lengths, quality, tags, gain curve, E(D), map (+ rejects if any)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    # plotly.js drew every figure (it adds its SVG layers when it runs; the saved page has none)
    assert dom.stdout.count('class="main-svg"') >= figures
    shot = tmp_path / "r.png"
    subprocess.run([*flags, "--window-size=1200,3000", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    orange = np.all(np.abs(pixels.astype(int) - [0xD9, 0x48, 0x0F]) < 24, axis=1).sum()
    assert orange > 5_000, "the selected-sample colour should fill bars and points in the screenshot"
