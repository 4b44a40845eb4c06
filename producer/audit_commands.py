"""``salient audit`` (a job against its ground truth) and ``salient compare`` (two jobs' maps of the same images).
Light: SQL summaries (storage/audits.py) and numpy map comparisons (storage/run_comparison.py), no torch."""

from __future__ import annotations

import json

import click

from salient_maps.storage.job_options import data_dir_option
from salient_maps.storage.settings import Settings

FORMATS = click.Choice(["text", "jsonl"])


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command()
@click.argument("job_id", required=False)
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True,
              help="text: summary and the top suspects; jsonl: one record per image and method, best suspect first.")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Suspects listed in text.")
@click.option("--method", default=None, help="Rank only this method's explanations.")
@click.option("--class", "class_id", type=click.IntRange(0), default=None,
              help="Rank only this class's images (a per-class view: e.g. the class a shortcut helps).")
@data_dir_option("--data", "--out")
def audit(job_id, fmt, top, method, class_id, data_dir):
    """Accuracy, per-class means of every localisation metric and the "right for the wrong reason" list of a job
    (default: the newest): correct predictions whose map lies least on the object (lowest energy_in_box), or, without
    boxes or masks, whose map lies most on the image's border (highest border_energy)."""
    from salient_maps.storage.audits import METRIC_COLUMNS, audit_job, suspects
    from salient_maps.storage.database import connect

    db = connect(Settings().with_data_dir(data_dir).resolved_database_url)
    with db.connect() as conn:
        try:
            summary = audit_job(conn, job_id)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
        ranked = suspects(conn, summary.job_id, summary.ranked_by, method=method, class_id=class_id,
                          limit=top if fmt == "text" else None)
        if fmt == "jsonl":
            for record in ranked:
                click.echo(json.dumps(record))
            return
        accuracy = (f"accuracy {summary.accuracy:.3f} ({summary.correct}/{summary.labelled} labelled)"
                    if summary.labelled else "no labels")
        click.echo(f"job {summary.job_id}: {summary.images} images explained, {accuracy}")
        columns = (*METRIC_COLUMNS, "localization_correct")
        click.echo("method\tclass\tname\texplanations\t" + "\t".join(columns))
        for row in summary.classes:
            click.echo(f"{row['method']}\t{row['class_id']}\t{row['class_name']}\t{row['explanations']}\t"
                       + "\t".join(_number(row[c]) for c in columns))
        order = "lowest" if summary.ranked_by == "energy_in_box" else "highest"
        click.echo(f"right for the wrong reason ({order} {summary.ranked_by} first):")
        for n, record in enumerate(ranked, 1):
            click.echo(f"{n:>4}. {record['uri']}\tclass {record['class_id']}\t{record['method']}\t"
                       f"{record[summary.ranked_by]:.3f}")


@click.command()
@click.argument("job_a")
@click.argument("job_b")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True,
              help="text: summary and the biggest shifts; jsonl: one record per image × method × class, "
                   "biggest shift first.")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Shifts listed in text.")
@data_dir_option("--data", "--out")
def compare(job_a, job_b, fmt, top, data_dir):
    """How the maps of the images common to JOB_A and JOB_B (same content) moved: Spearman rank correlation and
    IoU of the top-10 % regions per image × method × class, and whether the top-1 class changed. Biggest shifts
    (lowest top10_iou) first."""
    from salient_maps.storage.database import connect
    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.run_comparison import compare_jobs

    settings = Settings().with_data_dir(data_dir)
    db = connect(settings.resolved_database_url)
    with db.connect() as conn:
        try:
            result = compare_jobs(conn, MapReader.for_settings(settings), job_a, job_b)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    if fmt == "jsonl":
        for pair in result.pairs:
            click.echo(json.dumps(pair))
        return
    s = result.summary()
    click.echo(f"jobs {s['job_a']} → {s['job_b']}: {s['images']} common images, {s['pairs']} maps compared, "
               f"{s['predictions_changed']} predictions changed; mean spearman {_number(s['mean_spearman'])}, "
               f"mean top10_iou {_number(s['mean_top10_iou'])}")
    click.echo("biggest shifts:")
    for n, pair in enumerate(result.pairs[:top], 1):
        changed = ", prediction changed" if pair["prediction_changed"] else ""
        click.echo(f"{n:>4}. {pair['uri']}\t{pair['method']}\tclass {pair['class_id']}\t"
                   f"top10_iou {_number(pair['top10_iou'])}\tspearman {_number(pair['spearman'])}{changed}")


COMMANDS = (audit, compare)
