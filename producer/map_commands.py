"""``salient maps`` and ``salient show``: a job's stored maps out as .npy/.png files, and one overlay drawn
on demand. Light side: numpy; drawing overlays imports OpenCV (the worker extra)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import click

from salient_maps.storage.job_options import data_dir_option
from salient_maps.storage.settings import Settings


def _job_style(settings: Settings, job_id: str | None):
    """The overlay style the job was run with (``--colormap``, ``--polarity``, ...)."""
    from salient_maps.storage.database import connect
    from salient_maps.storage.overlays import OverlayStyle
    from salient_maps.storage.results import find_job, result_settings

    db = connect(settings.resolved_database_url)
    try:
        with db.connect() as conn:
            shared = result_settings(conn, find_job(conn, job_id))
    finally:
        db.dispose()
    return OverlayStyle(**shared.overlay) if shared is not None else OverlayStyle()


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A missing record or a bad choice, and drawing without OpenCV, end the command with one line."""
    try:
        yield
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except ModuleNotFoundError as exc:
        if exc.name != "cv2":
            raise
        raise click.ClickException("drawing overlays needs OpenCV: pip install 'salient-maps[worker]'") from None


def _int_set(text: str | None) -> set[int] | None:
    return {int(c) for c in text.split(",") if c.strip()} if text else None


@click.command("maps")
@click.argument("job_id", required=False)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the files.")
@click.option("--format", "fmt", type=click.Choice(["npy", "png"]), default="npy", show_default=True,
              help="npy: float32 arrays; png: viridis pictures of the 2-D ones.")
@click.option("--size", type=click.Choice(["input", "layer"]), default="input", show_default=True,
              help="input: the model's input size; layer: as computed (e.g. 7×7 for Grad-CAM on layer4).")
@click.option("--method", "methods", default=None, help="Only these methods (comma-separated).")
@click.option("--classes", default=None, help="Only these class ids (comma-separated).")
@click.option("--arrays", is_flag=True, help="Also each method's arrays (saliency: gradient, color, gray, ...).")
@click.option("--overlays", is_flag=True, help="Also draw each map's overlay PNG on the original image.")
@data_dir_option("--data")
def maps(job_id, out, fmt, size, methods, classes, arrays, overlays, data_dir):
    """Write a job's maps (default: the latest job) as OUT/<image>-<sha256[:8]>/<method>/<class id>.npy."""
    from salient_maps.storage.maps import export_maps
    from salient_maps.storage.results import iter_results

    settings = Settings().with_data_dir(data_dir)
    with _user_errors():
        style = _job_style(settings, job_id) if overlays else None
        n = export_maps(settings, iter_results(settings, job_id), out, fmt, size, arrays, overlays, style,
                        set(methods.split(",")) if methods else None, _int_set(classes))
    click.echo(f"{n} maps -> {out}")


@click.command("show")
@click.argument("image")
@click.option("--job", "job_id", default=None, help="Job id (default: the latest job).")
@click.option("--method", default=None, help="Method (default: the job's first).")
@click.option("--class", "class_id", type=int, default=None, help="Class id (default: the top-ranked one).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG file to write (default: print the map's numbers).")
@click.option("--thumbnail", is_flag=True, help="Draw on the stored thumbnail instead of the original image.")
@data_dir_option("--data")
def show(image, job_id, method, class_id, out, thumbnail, data_dir):
    """Draw one overlay of IMAGE (its URI, file name or sha256) from the stored map, or print the map."""
    from salient_maps.storage.maps import MapReader, picture_of
    from salient_maps.storage.results import iter_results

    settings = Settings().with_data_dir(data_dir)
    with _user_errors():
        matches = [r for r in iter_results(settings, job_id)
                   if image in (r["uri"], r["sha256"], r["uri"].rstrip("/").rsplit("/", 1)[-1])
                   and (method is None or r["method"] == method)
                   and (r["rank"] == 1 if class_id is None else r["class_id"] == class_id)]
        if not matches:
            raise LookupError(f"no record of {image!r} with that method and class in this job")
        record = matches[0]
        reader = MapReader.for_settings(settings)
        if out is None:
            heat = reader.map(record, "layer")
            click.echo(f"{record['uri']} {record['method']} class {record['class_id']} ({record['class_name']}, "
                       f"score {record['score']:.3f}); map {heat.shape[0]}×{heat.shape[1]} as computed" +
                       ("" if record.get("input_box") in (None, [0.0, 0.0, 1.0, 1.0]) else
                        ", over the model's crop x0,y0,x1,y1 = " +
                        ",".join(f"{v:.3f}" for v in record["input_box"]) + " of the image") + ":")
            if heat.size <= 32 * 32:
                click.echo("\n".join(" ".join(f"{v:.2f}" for v in row) for row in heat))
            else:
                click.echo(f"min {heat.min():.3f}, mean {heat.mean():.3f}, max {heat.max():.3f} "
                           "(--out FILE.png draws it)")
            return
        picture = None if thumbnail else picture_of(record, settings, settings.overlay_max_side, local_files=True)
        out.write_bytes(reader.overlay_png(record, _job_style(settings, job_id), picture))
    click.echo(f"{record['uri']} {record['method']} class {record['class_id']} -> {out}")


COMMANDS = (maps, show)
