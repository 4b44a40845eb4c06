"""`salient report`: a 1,000-image job reported quickly, everything untrusted escaped, and the page
working in a real headless Chromium (no console errors, filters, pages, sort, screenshot)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from chromium import Chromium, find_chromium
from salient_maps.storage.report import PAGE_SIZE, build_report
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
    summary = build_report(Settings().with_data_dir(data), job.job_id, out)
    print(f"\nreport of {summary.images} images / {summary.explanations} explanations: {summary.seconds:.2f}s")
    return summary


def test_a_thousand_images_report(report_1000, job_1000):
    _, job = job_1000
    assert report_1000.images == 1000 and report_1000.explanations == job.explanations
    assert (report_1000.path.parent / "class-maps").is_dir()


def test_untrusted_text_is_escaped(report_1000):
    page = report_1000.path.read_text()
    for raw in ("<script>alert(1)", "<img src=x", "<b>corrupt</b>", "<b>definition</b>", 'onerror="alert(2)'):
        assert raw not in page, raw
    assert "&lt;b&gt;corrupt&lt;/b&gt;" in page  # the failure table shows the reason as text
    assert page.count("<script") == 2  # the data block and the page's own script


def test_pictures_are_drawn_into_the_folder_and_maps_link_to_a_local_store(job_1000, tmp_path):
    data, job = job_1000
    linked = build_report(Settings().with_data_dir(data), job.job_id, tmp_path / "linked")
    assert '"../' in linked.path.read_text()  # the raw maps: the store's shard, beside the report folder
    pictures = {p.name for p in (tmp_path / "linked" / "pictures").iterdir()}
    # a thumbnail per done image and an overlay per explanation, drawn from the shard
    assert len(pictures) == (job.images - job.failed) * (1 + len(job.methods) * job.topk)
    copied = build_report(Settings().with_data_dir(data), job.job_id, tmp_path / "copied", copy=True)
    assert '"../' not in copied.path.read_text()
    assert {p.name for p in (tmp_path / "copied" / "pictures").iterdir()} == pictures


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


def evil_class_images(data: Path, job_id: str) -> int:
    db = sqlite3.connect(data / "salient.db")
    return db.execute("SELECT COUNT(DISTINCT items.id) FROM items JOIN explanations ON explanations.sha256 = items.sha256 "
                      "WHERE items.job_id = ? AND explanations.class_id = ?",
                      (job_id, CLASSES.index(EVIL_CLASS))).fetchone()[0]


def test_page_works_in_chromium(browser, report_1000, job_1000, tmp_path):
    data, job = job_1000
    browser.open(report_1000.path.as_uri())
    count = "Number(document.getElementById('count').dataset.count)"
    cards = "document.querySelectorAll('#gallery .card').length"

    def choose(select: str, value: str) -> None:
        browser.evaluate(f"(() => {{ const s = document.getElementById('{select}'); s.value = {value!r}; "
                         "s.dispatchEvent(new Event('change')); })()")

    assert browser.evaluate(count) == 1000 and browser.evaluate(cards) == PAGE_SIZE
    # The HTML file name is shown as text, and no script from the data ran.
    names = browser.evaluate("Array.from(document.querySelectorAll('.card .name')).map(e => e.textContent)")
    assert EVIL_NAME in names and EVIL_FILE_NAME in names
    assert browser.evaluate("document.querySelectorAll('script').length") == 2
    # Images from the object store load (links resolve): scroll the gallery into view first.
    browser.evaluate("document.getElementById('gallery-title').scrollIntoView()")
    browser.evaluate("new Promise(r => setTimeout(r, 300))")
    loaded = ("Promise.all(Array.from(document.querySelectorAll('#gallery .card:first-child img')).map(i => "
              "i.decode().then(() => i.naturalWidth, () => 0)))")
    widths = browser.evaluate(loaded)
    assert widths and all(w > 0 for w in widths), widths
    browser.screenshot(tmp_path / "gallery.png")

    choose("f-status", "failed")
    assert browser.evaluate(count) == job.failed == browser.evaluate(cards)
    assert browser.evaluate("location.hash") == "#status=failed"
    choose("f-status", "")
    # data.classes is in order of first appearance, so find the option by its label instead.
    browser.evaluate(f"(() => {{ const s = document.getElementById('f-class'); s.value = Array.from(s.options)"
                     f".find(o => o.textContent === {EVIL_CLASS!r}).value; s.dispatchEvent(new Event('change')); }})()")
    assert browser.evaluate(count) == evil_class_images(data, job.job_id)
    choose("f-class", "-1")
    choose("f-method", "0")
    assert browser.evaluate(count) == job.images - job.failed
    assert browser.evaluate("new Set(Array.from(document.querySelectorAll('#gallery figcaption b')).map(b => b.textContent)).size") == 1
    choose("f-method", "-1")
    choose("f-sort", "score")
    scores = browser.evaluate("Array.from(document.querySelectorAll('#gallery .card')).slice(0, 20)"
                              ".map(c => parseFloat(c.querySelector('figcaption .cls').textContent.split(' ').pop()))")
    assert scores == sorted(scores, reverse=True)
    browser.evaluate("document.getElementById('next').click()")
    assert browser.evaluate("document.getElementById('page').textContent") == "page 2 of 10"
    assert browser.errors == []
    # A filtered view can be linked: the address alone restores it (a new document, not a fragment change).
    browser.open("about:blank")
    browser.open(report_1000.path.as_uri() + "#status=failed")
    assert browser.evaluate(count) == job.failed
    assert browser.errors == []


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
    browser.open(summary.path.as_uri())
    browser.evaluate("document.getElementById('gallery-title').scrollIntoView()")
    browser.evaluate("new Promise(r => setTimeout(r, 500))")
    shot = browser.screenshot(tmp_path / "report.png")
    browser.evaluate("window.scrollTo(0, 0)")
    browser.screenshot(tmp_path / "report-top.png")
    assert browser.errors == []
    shutil.copyfile(shot, REPO / "docs" / "report-screenshot.png")
