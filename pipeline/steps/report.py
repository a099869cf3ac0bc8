"""Command ``report``: the leaderboard, accuracy curves and paired tests of an experiment's runs
(``pipeline.reports.leaderboard``)."""

from pathlib import Path

import click

from pipeline.reports import comparisons
from pipeline.reports.leaderboard import write_report
from pipeline.tracking.stores import open_tracking_store


@click.command("report")
@click.argument("experiment_name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="The report goes to OUT/EXPERIMENT_NAME/.")
@click.option("--reference", default=comparisons.REFERENCE_EXPERIMENT, show_default=True,
              help="Experiment (in the same store) whose seeded runs the paired test compares each point with.")
def report_command(experiment_name, out, reference):
    """Writes leaderboard.md, leaderboard.csv and accuracy_curves.png to OUT/EXPERIMENT_NAME/ and logs them."""
    open_tracking_store()
    result = write_report(experiment_name, out, reference)
    click.echo(result["markdown"])
    click.echo(f"written to {result['directory']} and logged to run {result['run_id']}")
