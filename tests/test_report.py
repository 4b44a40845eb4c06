"""`salient report`: a 1,000-image job reported with every picture, everything untrusted escaped, and the page
working in a real headless Chromium (no console errors, filters, pages, sort, screenshot); a 5,000-image job whose
summaries equal a computation of our own over the rows, and whose gallery pages and filters across the whole job,
from file:// and over http."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import sqlite3
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from chromium import Chromium, find_chromium
from salient_maps.storage.audits import audit_job, suspects
from salient_maps.storage.database import connect
from salient_maps.storage.report import PAGE_SIZE, build_report
from salient_maps.storage.report.audit_page import audit_of, suspects_of
from salient_maps.storage.report.summary import HISTOGRAM_BINS, summarize
from salient_maps.storage.results import find_job
from salient_maps.storage.settings import Settings
from synthetic_results import CLASSES, EVIL_CLASS, EVIL_FILE_NAME, EVIL_NAME, make_job

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def job_1000(tmp_path_factory):
    data = tmp_path_factory.mktemp("report-data")
    return data, make_job(data, 1000)  # 900 done × 2 methods × 3 classes, 100 failed


@pytest.fixture(scope="module")
def report_1000(job_1000, tmp_path_factory):
    data, job = job_1000
    out = tmp_path_factory.mktemp("report")
    summary = build_report(Settings().with_data_dir(data), job.job_id, out, pictured=1000)
    print(f"\nreport of {summary.images} images / {summary.explanations} explanations: {summary.seconds:.2f}s")
    return summary


def test_a_thousand_images_report(report_1000, job_1000):
    _, job = job_1000
    assert report_1000.images == 1000 and report_1000.explanations == job.explanations
    folder = report_1000.path.parent
    assert (folder / "class-maps").is_dir() and (folder / "audit.html").is_file()
    # ten gallery pages of data, each one script call with its own name
    pages = sorted(p.name for p in (folder / "data").glob("page-*.js"))
    assert pages == [f"page-{i:06d}.js" for i in range(10)]
    assert (folder / "data" / "page-000003.js").read_text().startswith('salientReport.receive("page-000003",')


def test_untrusted_text_is_escaped(report_1000):
    page = report_1000.path.read_text()
    for raw in ("<script>alert(1)", "<img src=x", "<b>corrupt</b>", "<b>definition</b>", 'onerror="alert(2)'):
        assert raw not in page, raw
    assert "&lt;b&gt;corrupt&lt;/b&gt;" in page  # the failure table shows the reason as text
    assert page.count("<script") == 2  # the data block and the page's own script


def test_pictures_are_drawn_into_the_folder_and_maps_link_to_a_local_store(job_1000, tmp_path):
    data, job = job_1000
    linked = build_report(Settings().with_data_dir(data), job.job_id, tmp_path / "linked", pictured=1000)
    assert '"../' in linked.path.read_text()  # the raw maps: the store's shard, beside the report folder
    pictures = {p.name for p in (tmp_path / "linked" / "pictures").iterdir()}
    # a thumbnail per done image and an overlay per explanation, drawn from the shard
    assert len(pictures) == (job.images - job.failed) * (1 + len(job.methods) * job.topk)
    copied = build_report(Settings().with_data_dir(data), job.job_id, tmp_path / "copied", copy=True, pictured=1000)
    assert '"../' not in copied.path.read_text()
    assert {p.name for p in (tmp_path / "copied" / "pictures").iterdir()} == pictures
    # by default only the first pages (and each sort's first page) are drawn
    few = build_report(Settings().with_data_dir(data), job.job_id, tmp_path / "few", pictured=100)
    thumbnails = [p for p in (tmp_path / "few" / "pictures").iterdir() if p.suffix == ".jpg"]
    assert 90 <= len(thumbnails) < job.images - job.failed
    assert few.images == job.images


def test_cli_writes_the_report(job_1000, run_cli, tmp_path):
    data, job = job_1000
    result = run_cli(["report", job.job_id, "--data", data, "--out", tmp_path / "r"])
    assert "1000 images" in result.output and (tmp_path / "r" / "index.html").is_file()
    run_cli(["report", "no-such-job", "--data", data, "--out", tmp_path / "x"], expect_exit=1)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if find_chromium() is None:
        if os.environ.get("CI"):  # CI installs it: a missing browser there is a broken setup, not a skip
            pytest.fail("chromium is not installed although CI's test command installs it")
        pytest.skip("chromium is not installed: run tests/browser_install.sh (CI does)")
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


COUNT = "Number(document.getElementById('count').dataset.count)"
EXACT = "document.getElementById('count').dataset.exact === '1'"
CARDS = "document.querySelectorAll('#gallery .card').length"
NUMBERS = "Array.from(document.querySelectorAll('#gallery .card')).map(c => Number(c.dataset.number))"
PAGE = "document.getElementById('page').textContent"


def settle(browser) -> None:
    browser.evaluate("salientReport.settled()")


def choose(browser, select: str, value: str) -> None:
    browser.evaluate(f"(() => {{ const s = document.getElementById('{select}'); s.value = {value!r}; "
                     "s.dispatchEvent(new Event('change')); })()")
    settle(browser)


def click(browser, button: str) -> None:
    browser.evaluate(f"document.getElementById('{button}').click()")
    settle(browser)


def open_report(browser, url: str) -> None:
    browser.open("about:blank")
    browser.open(url)
    settle(browser)


def evil_class_images(data: Path, job_id: str) -> int:
    db = sqlite3.connect(data / "salient.db")
    return db.execute("SELECT COUNT(DISTINCT items.id) FROM items "
                      "JOIN explanations ON explanations.sha256 = items.sha256 "
                      "WHERE items.job_id = ? AND explanations.class_id = ?",
                      (job_id, CLASSES.index(EVIL_CLASS))).fetchone()[0]


def test_page_works_in_chromium(browser, report_1000, job_1000, tmp_path):
    data, job = job_1000
    open_report(browser, report_1000.path.as_uri())
    assert browser.evaluate(COUNT) == 1000 and browser.evaluate(CARDS) == PAGE_SIZE
    # The HTML file name is shown as text, and no script from the data ran.
    names = browser.evaluate("Array.from(document.querySelectorAll('.card .name')).map(e => e.textContent)")
    assert EVIL_NAME in names and EVIL_FILE_NAME in names
    assert browser.evaluate("document.querySelectorAll('body script').length") == 2
    # Images from the object store load (links resolve): scroll the gallery into view first.
    browser.evaluate("document.getElementById('gallery-title').scrollIntoView()")
    browser.evaluate("new Promise(r => setTimeout(r, 300))")
    loaded = ("Promise.all(Array.from(document.querySelectorAll('#gallery .card:first-child img')).map(i => "
              "i.decode().then(() => i.naturalWidth, () => 0)))")
    widths = browser.evaluate(loaded)
    assert widths and all(w > 0 for w in widths), widths
    browser.screenshot(tmp_path / "gallery.png")

    choose(browser, "f-status", "failed")
    assert browser.evaluate(COUNT) == job.failed == browser.evaluate(CARDS)
    assert browser.evaluate("location.hash") == "#status=failed"
    choose(browser, "f-status", "")
    browser.evaluate(f"(() => {{ const s = document.getElementById('f-class'); s.value = Array.from(s.options)"
                     f".find(o => o.textContent === {EVIL_CLASS!r}).value; s.dispatchEvent(new Event('change')); }})()")
    settle(browser)
    assert browser.evaluate(COUNT) == evil_class_images(data, job.job_id)
    choose(browser, "f-class", "-1")
    choose(browser, "f-method", "0")
    assert browser.evaluate(COUNT) == job.images - job.failed
    assert browser.evaluate("new Set(Array.from(document.querySelectorAll('#gallery figcaption b'))"
                            ".map(b => b.textContent)).size") == 1
    choose(browser, "f-method", "-1")
    choose(browser, "f-sort", "score")
    scores = browser.evaluate("Array.from(document.querySelectorAll('#gallery .card')).slice(0, 20)"
                              ".map(c => parseFloat(c.querySelector('figcaption .cls').textContent.split(' ').pop()))")
    assert scores == sorted(scores, reverse=True)
    click(browser, "next")
    assert browser.evaluate(PAGE) == "page 2 of 9"  # the 900 images with a score
    assert browser.errors == []
    # A filtered view can be linked: the address alone restores it (a new document, not a fragment change).
    open_report(browser, report_1000.path.as_uri() + "#status=failed")
    assert browser.evaluate(COUNT) == job.failed
    assert browser.errors == []


# --- 5,000 images: summaries against the rows, paging and filters across the whole job ---------------------------

@pytest.fixture(scope="module")
def job_5000(tmp_path_factory):
    data = tmp_path_factory.mktemp("report-5000")
    job = make_job(data, 5000, topk=2, classes=30, labels=True, localization=True, seed=5)
    out = tmp_path_factory.mktemp("report-5000-out")
    return data, job, build_report(Settings().with_data_dir(data), job.job_id, out, pictured=200)


def rows_of(data: Path, job_id: str) -> tuple[list[dict], list[dict]]:
    """Items and explanations as plain dicts, read with sqlite3 (not the report's code)."""
    db = sqlite3.connect(data / "salient.db")
    db.row_factory = sqlite3.Row
    items = [dict(r) for r in db.execute("SELECT * FROM items WHERE job_id = ? ORDER BY id", (job_id,))]
    explanations = [dict(r) for r in db.execute(
        "SELECT e.*, i.id AS item_id FROM explanations e JOIN items i ON i.sha256 = e.sha256 WHERE i.job_id = ? "
        "AND i.status IN ('done', 'skipped')", (job_id,))]
    for e in explanations:
        e["metrics"] = (json.loads(e["extra"]) or {}).get("metrics") or {} if e["extra"] else {}
    return items, explanations


def test_summaries_equal_a_computation_over_the_rows(job_5000):
    data, job, _ = job_5000
    items, explanations = rows_of(data, job.job_id)
    db = connect(Settings().with_data_dir(data).resolved_database_url)
    with db.connect() as conn:
        summary = summarize(conn, find_job(conn, job.job_id))
    db.dispose()
    assert summary.statuses == dict(Counter(i["status"] for i in items))
    assert summary.failures[0][1] == 1 and len(summary.failures) == 20  # every reason differs (#i)
    assert summary.explanations == len(explanations) == job.explanations
    assert summary.methods == sorted(job.methods)
    assert summary.labelled == sum(i["label"] is not None for i in items)
    for method in job.methods:
        mine = [e for e in explanations if e["method"] == method]
        for name in ("deletion_auc", "insertion_auc", "drop"):
            values = [e["metrics"][name] for e in mine]
            mean, n = summary.means[method][name]
            assert n == len(values) and mean == pytest.approx(np.mean(values), abs=1e-12)
            assert summary.histograms[name][method] == np.histogram(values, HISTOGRAM_BINS, (0, 1))[0].tolist()
        for name in ("energy_in_box", "border_energy", "pointing_game"):
            mean, n = summary.means[method][name]
            assert n == len(mine) and mean == pytest.approx(np.mean([e[name] for e in mine]), abs=1e-12)
        assert summary.means[method]["localization_iou"] == (None, 0)
        assert summary.increase[method] == pytest.approx(np.mean([e["metrics"]["increase"] for e in mine]))
        for curve in ("deletion_curve", "insertion_curve"):
            expected = np.mean([e["metrics"][curve] for e in mine], axis=0)
            assert summary.curves[curve][method] == pytest.approx(expected.tolist(), abs=1e-12)
    top = Counter(e["class_id"] for e in explanations if e["method"] == summary.methods[0] and e["rank"] == 1)
    scores = defaultdict(list)
    for e in explanations:
        if e["method"] == summary.methods[0] and e["rank"] == 1:
            scores[e["class_id"]].append(e["score"])
    assert [(c, n) for c, n, _ in summary.predicted] == sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:50]
    assert all(s == pytest.approx(np.mean(scores[c])) for c, _, s in summary.predicted)


def test_the_audit_page_equals_storage_audits(job_5000):
    """The page's numbers come from the report's tables; storage/audits.py's own queries must agree."""
    data, job, report = job_5000
    page = (report.path.parent / "audit.html").read_text()
    db = connect(Settings().with_data_dir(data).resolved_database_url)
    with db.connect() as conn:
        audit = audit_job(conn, job.job_id)
        first = list(suspects(conn, job.job_id, audit.ranked_by, limit=50))
        mine = audit_of(conn, summarize(conn, find_job(conn, job.job_id)))
        assert suspects_of(conn, audit.ranked_by, 50) == first
    db.dispose()
    assert (mine.images, mine.labelled, mine.correct, mine.ranked_by) == \
        (audit.images, audit.labelled, audit.correct, audit.ranked_by) == (4500, 4500, mine.correct, "energy_in_box")
    assert len(mine.classes) == len(audit.classes) == 2 * 30
    for a, b in zip(mine.classes, audit.classes):
        assert a == {k: pytest.approx(v, abs=1e-12) if isinstance(v, float) else v for k, v in b.items()}
    assert f"accuracy {audit.accuracy:.3f}" in page and len(first) == 50
    assert page.count("<figure>") == 50 and f"{first[0][audit.ranked_by]:.3f}" in page


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path):
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_paging_and_filters_across_the_whole_job(browser, job_5000):
    data, job, report = job_5000
    items, explanations = rows_of(data, job.job_id)
    number = {item["id"]: n for n, item in enumerate(items)}
    open_report(browser, report.path.as_uri())
    assert browser.evaluate(COUNT) == 5000 and browser.evaluate(NUMBERS) == list(range(100))
    click(browser, "next")
    assert browser.evaluate(NUMBERS) == list(range(100, 200)) and browser.evaluate(PAGE) == "page 2 of 50"
    # a page far from the first, from the address: its cards come from its own data file
    open_report(browser, report.path.as_uri() + "#page=47")
    assert browser.evaluate(NUMBERS) == list(range(4600, 4700))
    assert browser.evaluate("document.querySelector('#gallery .card .name').textContent") == "img0004600.png"

    # one filter: its list, exact at once; the last page holds the rest
    wrong = [number[i["id"]] for i in items if i["label"] is not None and i["label"] != i["predicted"]]
    open_report(browser, report.path.as_uri())
    choose(browser, "f-correct", "0")
    assert browser.evaluate(COUNT) == len(wrong) and browser.evaluate(EXACT)
    assert browser.evaluate(NUMBERS) == wrong[:100]
    pages = -(-len(wrong) // 100)
    open_report(browser, report.path.as_uri() + f"#correct=0&page={pages}")
    assert browser.evaluate(NUMBERS) == wrong[(pages - 1) * 100:]
    assert browser.evaluate("document.getElementById('next').disabled")

    # two filters: walked page by page until the end, then exact
    method = sorted(job.methods).index("saliency")
    expected = sorted({number[e["item_id"]] for e in explanations if e["class_id"] == 7 and e["method"] == "saliency"
                       and items[number[e["item_id"]]]["label"] != items[number[e["item_id"]]]["predicted"]})
    open_report(browser, report.path.as_uri() + f"#correct=0&class=7&method={method}")
    seen = browser.evaluate(NUMBERS)
    while not browser.evaluate("document.getElementById('next').disabled"):
        click(browser, "next")
        seen += browser.evaluate(NUMBERS)
    assert seen == expected and browser.evaluate(COUNT) == len(expected) and browser.evaluate(EXACT)
    classes = browser.evaluate("Array.from(document.querySelectorAll('#gallery figcaption .cls'))"
                               ".map(e => e.textContent.split(' ').slice(0, -1).join(' '))")
    assert set(classes) == {"class 7"}

    # a sort with a threshold: the values in order, the count from a binary search of the list
    gradcam = sorted(job.methods).index("gradcam")
    top = sorted((e["energy_in_box"], number[e["item_id"]]) for e in explanations
                 if e["method"] == "gradcam" and e["rank"] == 1)
    within = [(v, n) for v, n in top if 0.2 <= round(v, 5) <= 0.6]  # the page holds 5 digits
    open_report(browser, report.path.as_uri() + f"#method={gradcam}&sort=energy_in_box&min=0.2&max=0.6&page=2")
    assert browser.evaluate(COUNT) == len(within) and browser.evaluate(NUMBERS) == [n for _, n in within[100:200]]
    # the sort with a filter on top: the walk keeps the order
    choose(browser, "f-status", "done")
    assert browser.evaluate(NUMBERS) == [n for _, n in within[:100]]
    assert browser.errors == []

    # over http the same files load (as <script src>, like file://)
    server = serve(report.path.parent)
    try:
        open_report(browser, f"http://127.0.0.1:{server.server_address[1]}/index.html#class=7")
        assert browser.evaluate(COUNT) == len({e["item_id"] for e in explanations if e["class_id"] == 7})
        click(browser, "next")
        assert browser.evaluate(PAGE).startswith("page 2 of")
        assert browser.errors == []
    finally:
        server.shutdown()


def test_screenshot_for_the_readme(browser, tmp_path):
    """A real run (bundled model, metrics) reported and photographed; docs/report-screenshot.png is
    refreshed from it when UPDATE_REPORT_SCREENSHOT=1."""
    if os.environ.get("UPDATE_REPORT_SCREENSHOT") != "1":
        pytest.skip("set UPDATE_REPORT_SCREENSHOT=1 to refresh docs/report-screenshot.png")
    from click.testing import CliRunner

    from salient_maps.producer.cli import main
    from salient_maps.workers.cli import export_sample_images

    data = tmp_path / "demo"
    images = export_sample_images(tmp_path / "images")
    args = ["run", str(images), "--out", str(data), "--methods", "gradcam,saliency", "--topk", "2",
            "--metrics", "deletion,insertion,drop", "--metric-steps", "8"]
    assert CliRunner().invoke(main, args).exit_code == 0
    summary = build_report(Settings().with_data_dir(data), None, tmp_path / "report")
    open_report(browser, summary.path.as_uri())
    browser.evaluate("document.getElementById('gallery-title').scrollIntoView()")
    browser.evaluate("new Promise(r => setTimeout(r, 500))")
    shot = browser.screenshot(tmp_path / "report.png")
    browser.evaluate("window.scrollTo(0, 0)")
    browser.screenshot(tmp_path / "report-top.png")
    assert browser.errors == []
    shutil.copyfile(shot, REPO / "docs" / "report-screenshot.png")
