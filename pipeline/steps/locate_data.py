"""Command ``locate-data``: where the raw Fashion-MNIST files are (``make data`` installs them if not).

Imports no PyTorch (unless it must download the files): it looks in the places ``pipeline.core.idx`` knows.
"""

import click

from pipeline.core.idx import locate_raw_files


@click.command("locate-data")
@click.option("--data-dir", default="", help="Folder to check first.")
def locate_data_command(data_dir):
    """Downloads them with torchvision if none of the usual places has them."""
    found = locate_raw_files(data_dir)
    click.echo(f"Fashion-MNIST raw files: {found['train_images'].parent}")
