"""Command ``promote``: move a model family's ``champion`` alias to a version by hand.

``champion`` (what ``make serve`` serves) otherwise moves only to a better version chosen on the default
split (``pipeline.tracking.registry``); this is the explicit way to put any version there, e.g. one chosen
on another split on purpose.
"""

import click

from pipeline.config import MODELS
from pipeline.tracking.registry import promote_by_hand
from pipeline.tracking.stores import open_tracking_store


@click.command("promote")
@click.option("--model", type=click.Choice(list(MODELS)), default="softmax", show_default=True,
              help="The model family whose registered model (fashion-mnist-<model>) holds the version.")
@click.option("--version", required=True, help="The registered model version to make the champion.")
def promote_command(model, version):
    open_tracking_store()
    click.echo(promote_by_hand(model, version))
