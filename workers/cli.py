"""Heavy subcommands of ``salient`` (registered as ``salient.commands`` entry points)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from salient_maps.storage.database import add_items, close_listing, connect, create_job
from salient_maps.storage.job_options import (
    DEFAULT_METHODS,
    METHOD_OPTIONS,
    data_dir_option,
    device_option,
    job_options,
    job_spec,
    labels_option,
    model_option,
    weights_option,
)
from salient_maps.storage.objects import open_store
from salient_maps.storage.results import iter_results, write_results
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, iter_entries, iter_uris, with_command_line_roots


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("salient", "torch", "torchvision", "timm", "opencv-python-headless"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def explain_sources(sources, *, model, weights, layer, methods, topk, classes, batch_size, device, precision,
                    data_dir, show_progress=True, labels=None, localize=False,
                    **options) -> tuple[str, Counter, float, Settings]:
    """Create a job for the sources and explain it in-process; returns (job id, status counts, seconds, settings).
    ``options``: the spec options of ``storage.job_options`` (method, metric and overlay options)."""
    import torch

    from .explainers import SpecError, load_setup
    from .factories import is_factory
    from .process import pending_items

    # What this command line names is readable, as in any in-process command (storage/uri_policy.py).
    named = [str(s) for s in sources] + [str(p) for p in (weights, labels, model) if p and Path(p).is_file()]
    settings = with_command_line_roots(Settings().with_data_dir(data_dir), named)
    if is_factory(model):  # the user runs their own code: the factory they name is allowed here
        settings = settings.model_copy(update={"model_factories": [*settings.model_factories, model]})
    torch.use_deterministic_algorithms(True, warn_only=True)
    spec = job_spec(model=model, weights=weights, labels=labels, layer=layer, methods=methods, topk=topk,
                    classes=classes, precision=precision, batch_size=batch_size, localize=localize, **options)
    try:
        setup = load_setup(spec, settings, device)
    except (SpecError, RuntimeError) as exc:  # RuntimeError: e.g. a device torch does not know
        raise click.ClickException(str(exc)) from None

    db = connect(settings.resolved_database_url)
    store = open_store(settings.resolved_object_store_url)
    explainer = setup.explainer
    job_settings = {"model": model, "weights": str(weights) if weights else None,
                    "layer": explainer.layer_name if explainer.layer is not None else None,
                    "methods": [m.name for m in explainer.methods], "targets": explainer.targets.describe(),
                    "precision": precision, "sources": [str(s) for s in sources],
                    "method_options": {k: v for k, v in spec["options"].items() if k in METHOD_OPTIONS},
                    "method_definitions": {m.name: " ".join((type(m).__doc__ or "").split())
                                           for m in explainer.methods},
                    "metrics": setup.metrics.params() if setup.metrics else None,
                    "overlay": setup.overlay_style.params(),
                    "labels": str(labels) if labels else None, "localize": localize,
                    "preprocessing": explainer.model.preprocessing(), "layout": explainer.layout.params(),
                    "versions": _versions()}
    processor = setup.processor(settings, db, store)
    job_id = create_job(db, job_settings, settings_digest=processor.digest)
    try:
        add_items(db, job_id, iter_entries([str(s) for s in sources], settings))
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    total, failed = close_listing(db, job_id) or (0, 0)
    counts: Counter = Counter(failed=failed)  # entries whose ground truth was unusable failed at listing
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]explaining"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("{task.fields[tally]}"), TimeElapsedColumn(),
        disable=not show_progress, transient=False,
    ) as progress:
        task = progress.add_task("explain", total=total, rate=0.0, tally="")

        def on_item(status: str) -> None:
            counts[status] += 1
            done = sum(counts.values())
            elapsed = time.perf_counter() - start
            progress.update(task, completed=done, rate=done / elapsed if elapsed else 0.0,
                            tally=f"done {counts['done']} failed {counts['failed']} skipped {counts['skipped']}")

        processor.run(pending_items(db, job_id), on_item=on_item)
    return job_id, counts, time.perf_counter() - start, settings


def _summary(job_id: str, counts: Counter, seconds: float, settings: Settings) -> str:
    done = counts["done"]
    rate = f", {done / seconds:.2f} img/s" if done and seconds else ""
    return (f"job {job_id}: done {done}, failed {counts['failed']}, skipped {counts['skipped']} "
            f"in {seconds:.1f}s{rate}; data in {settings.data_dir}")


@click.command()
@click.argument("sources", nargs=-1, required=True)
@job_options(local=True)
@data_dir_option("--out", "--data")
def run(sources, **options):
    """Explain every image in SOURCES (files, folders, file:// URIs) in-process, no servers needed.

    Writes one result shard per batch (maps and thumbnails, safetensors) under DATA/objects/shards and
    metadata to DATA/salient.db (DATA: the folder given as --out or --data); read them back with salient
    results, maps, show, report. Unreadable images become failed records; the run goes on and exits 0.
    """
    job_id, counts, seconds, settings = explain_sources(sources, **options)
    click.echo(_summary(job_id, counts, seconds, settings))


@click.command()
@data_dir_option("--out", "--data", default=Path("salient-demo"))
@click.option("--methods", default=DEFAULT_METHODS, show_default=True)
@device_option
def demo(data_dir: Path, methods: str, device: str):
    """Export scikit-image's sample photos to DATA/images, explain them with the bundled model and write a
    report (DATA/report/index.html)."""
    images = export_sample_images(data_dir / "images")
    job_id, counts, seconds, settings = explain_sources(
        [images], model="efficientnet_lite0", weights=None, layer=None, methods=methods, topk=3, classes=None,
        batch_size=8, device=device, precision="fp32", data_dir=data_dir)
    click.echo(_summary(job_id, counts, seconds, settings))

    from salient_maps.storage.report import build_report

    summary = data_dir / "results.csv"
    with open(summary, "w", newline="") as f:
        write_results(settings, job_id, "csv", f)
    for row in iter_results(settings, job_id):
        if row["rank"] == 1 and row["method"] == "gradcam":
            click.echo(f"  {Path(row['uri']).name:24} {row['class_name']} ({row['score']:.2f})")
    report = build_report(settings, job_id, data_dir / "report")
    click.echo(f"records:  {summary} (or: salient results --out {data_dir} --format csv)")
    click.echo(f"maps:     salient maps --data {data_dir} --out {data_dir / 'maps'}  (.npy; --overlays for PNGs)")
    click.echo(f"report:   {report.path.resolve()}  (open it in a browser: overlays of every image)")


@click.command("visualize-class")
@model_option(local=True)
@weights_option(local=True)
@labels_option(local=True)
@click.option("--class", "class_", required=True, help="The class: an id or a name (any case), e.g. 281 or tabby.")
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True, help="Gradient ascent steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="Step size.")
@click.option("--l2", type=click.FloatRange(0), default=1e-3, show_default=True,
              help="L2 penalty weight on the (normalised) image.")
@device_option
@data_dir_option("--data", "--out")
def visualize_class(model, weights, labels, class_, steps, lr, l2, device, data_dir):
    """Synthesise the image that maximises one class's logit (Simonyan et al. 2014): gradient ascent from
    the mean image with an L2 penalty. The PNG goes to the object store, a row to class_visualizations."""
    from .class_visualization import make_class_image
    from .models import ModelError, load_model
    from .targets import TargetError, parse_classes

    settings = Settings().with_data_dir(data_dir)
    try:
        loaded = load_model(model, weights, labels)
        class_ids = parse_classes(class_, loaded.class_names)
    except (ModelError, TargetError) as exc:
        raise click.ClickException(str(exc)) from None
    if len(class_ids) != 1:
        raise click.ClickException(f"give one class, not {len(class_ids)}")
    class_id = class_ids[0]
    db = connect(settings.resolved_database_url)
    store = open_store(settings.resolved_object_store_url)
    try:
        key, image = make_class_image(db, store, loaded, class_id, steps=steps, lr=lr, l2=l2, device=device)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{loaded.class_names[class_id]} ({class_id}): logit {image.scores[0]:.2f} -> {image.scores[-1]:.2f} "
               f"in {steps} steps; image {key} in {settings.resolved_object_store_url}")


@click.command()
@click.argument("sources", nargs=-1)
@click.option("--job", "job_id", default=None,
              help="Check this job's model, layer and methods on a sample of its explained images.")
@click.option("--sample", type=click.IntRange(1), default=16, show_default=True, help="Images to check.")
@click.option("--stops", type=click.IntRange(2), default=8, show_default=True,
              help="Cascade steps at which maps are compared (every weight layer is randomised in turn).")
@click.option("--topk", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Explain each image's K most probable classes under the trained model.")
@click.option("--model", default="efficientnet_lite0", show_default=True, help="With SOURCES: the model.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="With SOURCES.")
@click.option("--layer", default=None, help="With SOURCES: target layer (default: last spatial feature map).")
@click.option("--methods", default="gradcam,saliency", show_default=True, help="With SOURCES: methods to check.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample and randomisation seed.")
@device_option
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder for sanity-JOB.json.")
@data_dir_option("--data", note="; with --job, the job's")
def sanity(sources, job_id, sample, stops, topk, model, weights, layer, methods, seed, device, batch_size,
           out_dir, data_dir):
    """Sanity check (Adebayo et al. 2018): randomise the model's weight layers from the top down and
    measure how much each method's maps change (Spearman rank correlation and SSIM against the
    trained model's maps). Maps that stay the same do not depend on what the model learned."""
    import json

    from .methods import MethodError, build_methods
    from .models import ModelError, load_model, resolve_layer
    from .sanity import format_table, job_config, load_inputs, run_cascade, sample_uris

    if bool(job_id) == bool(sources):
        raise click.UsageError("give either --job JOB or SOURCES")
    settings = Settings().with_data_dir(data_dir)
    if job_id:
        db = connect(settings.resolved_database_url)
        with db.connect() as conn:
            try:
                config, uris = job_config(conn, job_id)
            except LookupError as exc:
                raise click.ClickException(str(exc)) from None
        model, weights, layer = config["model"], config.get("weights"), config.get("layer")
        method_names = config["methods"]
        options = {k: v for k, v in (config.get("method_options") or config.get("options") or {}).items()
                   if k in METHOD_OPTIONS}
    else:
        try:
            uris = list(iter_uris([str(s) for s in sources]))
        except SourceError as exc:
            raise click.ClickException(str(exc)) from None
        method_names, options = [m.strip() for m in methods.split(",") if m.strip()], {}
    # The sources on this command line, or the ones the job recorded from its own: readable as in `run`.
    settings = with_command_line_roots(settings, [str(s) for s in sources] if sources else config.get("sources", []))
    try:
        method_list = build_methods(method_names, options)
        loaded = load_model(model, weights)
        layer_name = resolve_layer(loaded, layer, needed=any("layer" in m.needs for m in method_list))
        x, used, unreadable = load_inputs(sample_uris(uris, sample, seed), loaded, settings)
    except (ModelError, MethodError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for uri, reason in unreadable.items():
        click.echo(f"skipped {uri}: {reason}", err=True)
    layers, steps = run_cascade(loaded, layer_name, method_list, x, topk=topk, stops=stops, seed=seed,
                                device=device, batch_size=batch_size)
    click.echo(format_table(steps))
    result = {"job": job_id, "model": loaded.tag, "layer": layer_name,
              "methods": {m.name: m.params() for m in method_list}, "images": used, "topk": topk, "seed": seed,
              "weight_layers_top_first": layers, "normalisation_layers": "kept",
              "steps": [{"randomised": s.randomised, "down_to": s.layer, "scores": s.scores} for s in steps]}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sanity-{job_id or 'sources'}.json"
    path.write_text(json.dumps(result, indent=1))
    if job_id:
        open_store(settings.resolved_object_store_url).put(f"sanity/{job_id}.json", path.read_bytes(),
                                                           "application/json")
    click.echo(f"{len(used)} images, {len(layers)} weight layers, {len(steps)} steps measured: {path}")


SAMPLE_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "camera", "retina", "hubble_deep_field")


def export_sample_images(folder: Path) -> Path:
    import cv2
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_IMAGES:
        path = folder / f"{name}.png"
        if not path.exists():
            pixels = getattr(skimage.data, name)()
            if pixels.ndim == 3:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(path), pixels)
    return folder
