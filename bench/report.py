"""`salient report` at dataset scale: a synthetic finished job of N images (rows only, written straight into an
SQLite database by tests/synthetic_results.py, plus the one small shard its rows point into), the report built in
a fresh process (wall and CPU seconds, each step's seconds, peak RSS, files and bytes written), then the page
opened from disk in headless Chromium (tests/chromium.py; tests/browser_install.sh installs it): time until the
first page is interactive, and filters, sort, thresholds and paging checked against the rows, each timed.
Last line: one JSON object.

    .venv/bin/python bench/report.py --images 100000
    .venv/bin/python bench/report.py --images 1000000 --keep /tmp/report-bench   # reuses the rows next time

The job by default is a dataset audit's shape: Grad-CAM top-1 with labels and the localisation metrics (columns);
``--faithfulness`` adds deletion/insertion curves, AUCs and drop in each row's JSON, ``--methods``/``--topk`` more
explanations per image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from chromium import Chromium, find_chromium  # noqa: E402
from synthetic_results import make_job  # noqa: E402

BUILD = """
import json, sys, time
from pathlib import Path
from salient_maps.storage.report import build_report
from salient_maps.storage.settings import Settings
cpu = time.process_time()
summary = build_report(Settings().with_data_dir(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3]))
print(json.dumps({"seconds": summary.seconds, "cpu_seconds": time.process_time() - cpu, "phases": summary.phases,
                  "cpu_phases": summary.cpu_phases, "images": summary.images, "explanations": summary.explanations}))
"""


def generate(folder: Path, args) -> tuple[str, float]:
    marker = folder / "job.json"
    shape = {"images": args.images, "methods": args.methods, "topk": args.topk, "faithfulness": args.faithfulness,
             "classes": args.classes}
    if marker.exists() and json.loads(marker.read_text())["shape"] == shape:
        return json.loads(marker.read_text())["job_id"], 0.0
    for stale in folder.glob("salient.db*"):
        stale.unlink()
    start = time.perf_counter()
    job = make_job(folder, args.images, methods=tuple(args.methods.split(",")), topk=args.topk, labels=True,
                   localization=True, metrics=args.faithfulness, classes=args.classes)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"shape": shape, "job_id": job.job_id}))
    return job.job_id, seconds


def expected(folder: Path, job_id: str) -> dict:
    """Counts the page must show, straight from the rows (sqlite3, not the report's code)."""
    db = sqlite3.connect(folder / "salient.db")
    one = lambda sql, *a: db.execute(sql, (job_id, *a)).fetchone()[0]  # noqa: E731
    by_class = db.execute(
        "SELECT e.class_id, COUNT(DISTINCT i.id) FROM items i JOIN explanations e ON e.sha256 = i.sha256 "
        "WHERE i.job_id = ? GROUP BY e.class_id ORDER BY COUNT(DISTINCT i.id) ASC LIMIT 1", (job_id,)).fetchone()
    return {"failed": one("SELECT COUNT(*) FROM items WHERE job_id = ? AND status = 'failed'"),
            "correct": one("SELECT COUNT(*) FROM items WHERE job_id = ? AND label = predicted"),
            "correct_failed_free": one("SELECT COUNT(*) FROM items WHERE job_id = ? AND label = predicted "
                                       "AND status = 'done'"),
            "box_below_0.1": one("SELECT COUNT(*) FROM items i JOIN explanations e ON e.sha256 = i.sha256 "
                                 "WHERE i.job_id = ? AND e.rank = 1 AND e.method = 'gradcam' "
                                 "AND ROUND(e.energy_in_box, 5) <= 0.1"),
            "rare_class": by_class[0], "rare_class_images": by_class[1]}


def browse(report: Path, truth: dict, profile: Path) -> dict:
    browser = Chromium(profile)
    figures: dict = {}
    try:
        start = time.perf_counter()
        browser.open(report.as_uri())
        browser.evaluate("salientReport.settled()")
        figures["open_ms"] = round(1000 * (time.perf_counter() - start))
        figures["first_page_interactive_ms"] = round(browser.evaluate("salientReport.firstRender"))
        count = "Number(document.getElementById('count').dataset.count)"
        cards = "document.querySelectorAll('#gallery .card').length"

        def timed(name: str, script: str):
            t = time.perf_counter()
            browser.evaluate(f"(() => {{ {script} }})()")
            browser.evaluate("salientReport.settled()")
            figures[f"{name}_ms"] = round(1000 * (time.perf_counter() - t))
            return browser.evaluate(count), browser.evaluate(cards)

        def choose(select: str, value: str) -> str:
            return (f"const s = document.getElementById('{select}'); s.value = {json.dumps(value)}; "
                    "s.dispatchEvent(new Event('change'));")

        checks = {"first page": browser.evaluate(cards) == 100}
        checks["status failed"] = timed("filter_status", choose("f-status", "failed"))[0] == truth["failed"]
        timed("filter_reset", choose("f-status", ""))
        checks["rare class"] = timed("filter_class", choose("f-class", str(truth["rare_class"])))[0] == \
            truth["rare_class_images"]
        timed("filter_class_reset", choose("f-class", "-1"))
        checks["correct"] = timed("filter_correct", choose("f-correct", "1"))[0] == truth["correct"]
        timed("page_next", "document.getElementById('next').click();")
        checks["page 2"] = browser.evaluate("document.getElementById('page').textContent").startswith("page 2 of")
        checks["sort + correct"] = timed("sort_energy_in_box", choose("f-sort", "energy_in_box"))[1] == 100
        values = browser.evaluate("Array.from(document.querySelectorAll('#gallery .card')).map(c => "
                                  "parseFloat(c.querySelector('figcaption .metrics').textContent.split('in box ')[1]))")
        checks["sorted"] = values == sorted(values)
        timed("filter_correct_reset", choose("f-correct", ""))
        got = timed("threshold", "const i = document.getElementById('f-max'); i.value = '0.1'; "
                                 "i.dispatchEvent(new Event('change'));")[0]
        checks["threshold"] = got == truth["box_below_0.1"]
        timed("page_next_sorted", "document.getElementById('next').click();")
        checks["no errors"] = browser.errors == []
        figures["errors"] = browser.errors[:5]
        figures["checks"] = checks
    finally:
        browser.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--methods", default="gradcam")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--faithfulness", action="store_true")
    parser.add_argument("--keep", type=Path, help="folder for the rows, reused when it holds the same job")
    args = parser.parse_args()
    # Chromium may still be writing its profile as we exit
    temporary = tempfile.TemporaryDirectory(prefix="salient-report-bench-", ignore_cleanup_errors=True)
    folder = args.keep or Path(temporary.name) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    job_id, generated = generate(folder, args)
    print(f"rows: {args.images} images in {folder} ({generated:.1f}s to generate)", flush=True)
    out = Path(temporary.name) / "report"
    built = subprocess.run([sys.executable, "-c", BUILD, str(folder), job_id, str(out)], check=True,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    build = json.loads(built.stdout.strip().splitlines()[-1])
    build["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    files = [p for p in out.rglob("*") if p.is_file()]
    build["files"], build["mib_written"] = len(files), round(sum(p.stat().st_size for p in files) / 2**20)
    print(f"build: {build}", flush=True)
    result = {"images": args.images, "methods": args.methods, "topk": args.topk, "faithfulness": args.faithfulness,
              "generate_seconds": round(generated, 1), "build": build, "load_average": os.getloadavg()}
    if find_chromium() is None:
        result["browser"] = "chromium not installed (tests/browser_install.sh)"
    else:
        result["browser"] = browse(out / "index.html", expected(folder, job_id), Path(temporary.name) / "profile")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
