"""What a run leaves behind and what reading it back costs: objects and bytes per image, bytes per explanation
row on PostgreSQL, SQL statements per image, CPU seconds per output stage, and overlay drawing time.

Runs ``salient run``'s engine in-process on N different 640×480 JPEGs (scikit-image's photos, shifted and
flipped) with PostgreSQL on loopback (tests/servers/launch.py) and a local object store, then draws every
record's overlay on its stored thumbnail and on the original picture. Last line: one JSON object.

    .venv/bin/python bench/output.py --images 48 --methods gradcam --topk 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "servers"))
import launch  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    """N different 640×480 JPEGs: sample photos shifted, flipped and marked in a corner."""
    import cv2
    import numpy as np
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = cv2.resize(photos[i % len(photos)], (700, 520))
        dy, dx = (i * 7) % 40, (i * 11) % 60
        picture = np.ascontiguousarray(rgb[dy:dy + 480, dx:dx + 640][:, ::-1 if i % 2 else 1])
        picture[:8, :8] = (i % 256, i // 256, 0)  # a mark of its own: no two files alike
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--methods", default="gradcam")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from sqlalchemy import event, text
    from sqlalchemy.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="salient-bench-output-"))
    postgres = launch.start_postgres(work / "postgres")
    try:
        os.environ["SALIENT_DATABASE_URL"] = postgres.url
        images = work / "images"
        make_images(images, args.images)
        statements = []
        event.listen(Engine, "before_cursor_execute", lambda *a, **k: statements.append(1))

        from salient_maps.workers.cli import explain_sources

        data = work / "data"
        job_id, counts, seconds, settings = explain_sources(
            [images], model=args.model, weights=None, layer=None, methods=args.methods, topk=args.topk, classes=None,
            batch_size=args.batch_size, device="cpu", precision="fp32", data_dir=data, show_progress=False)
        n_statements = len(statements)
        objects = [p for p in (data / "objects").rglob("*") if p.is_file()]
        from salient_maps.storage.database import connect

        with connect(postgres.url).connect() as conn:
            row_bytes = conn.execute(text("SELECT avg(pg_column_size(e.*)) FROM explanations e")).scalar()
            rows = conn.execute(text("SELECT count(*) FROM explanations")).scalar()
            with_indexes = conn.execute(text("SELECT pg_total_relation_size('explanations')")).scalar()

        from salient_maps.storage.maps import MapReader, picture_of
        from salient_maps.storage.results import iter_results

        records = [r for r in iter_results(settings, job_id) if r["shard"]]
        reader = MapReader.for_settings(settings)
        on_thumbnail, on_original = [], []
        for r in records:
            t = time.perf_counter()
            reader.overlay_png(r)
            on_thumbnail.append(time.perf_counter() - t)
        for r in records[: 3 * args.topk]:
            picture = picture_of(r, settings, settings.overlay_max_side, local_files=True)
            t = time.perf_counter()
            reader.overlay_png(r, picture=picture)
            on_original.append(time.perf_counter() - t)
        n = args.images
        result = {
            "images": n, "model": args.model, "methods": args.methods, "topk": args.topk,
            "done": counts["done"], "seconds": round(seconds, 2),
            "objects_per_image": round(len(objects) / n, 4),
            "bytes_per_image": round(sum(p.stat().st_size for p in objects) / n),
            "explanation_rows": rows, "bytes_per_row_pg_column_size": round(float(row_bytes), 1),
            "bytes_per_row_with_indexes": round(with_indexes / rows, 1),
            "sql_statements_per_image": round(n_statements / n, 3),
            "overlay_ms_on_thumbnail_median": round(statistics.median(on_thumbnail) * 1000, 2),
            "overlay_ms_on_original_640x480_median": round(statistics.median(on_original) * 1000, 2),
        }
        print(json.dumps(result))
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
