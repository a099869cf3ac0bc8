"""Command ``predict``: the most likely classes for image files (PNG/JPEG) or for test images."""

import sys
from pathlib import Path

import click
import numpy as np

from pipeline.cli import options_from
from pipeline.config import CLASS_NAMES, DataInput, ModelInput
from pipeline.core.images import UNSURE_BELOW, image_to_array, top_k, unsure
from pipeline.errors import PipelineError
from pipeline.support import tracking


@click.command("predict")
@options_from(ModelInput, DataInput)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--test", "test_count", type=int, default=0, help="Also predict the first N test images.")
def predict_command(model_uri, data, images, test_count):
    """Print the three most likely classes for image files (PNG/JPEG) or test images."""
    if not images and not test_count:
        raise click.UsageError("give image files and/or --test N")
    model = tracking.load_model(model_uri)
    names, arrays, failures = [], [], 0
    for path in images:
        try:
            arrays.append(image_to_array(path))
            names.append(str(path))
        except PipelineError as e:
            click.echo(f"error: {e.message}", err=True)
            failures += 1
    if test_count:
        splits = tracking.load_data(data)
        arrays.extend(splits.test_x[:test_count])
        names.extend(f"test[{i}] (true: {CLASS_NAMES[y]})" for i, y in enumerate(splits.test_y[:test_count]))
    if arrays:
        for name, top in zip(names, top_k(model, np.stack(arrays))):
            doubt = f"  (unsure: top probability below {UNSURE_BELOW})" if unsure(top) else ""
            click.echo(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top) + doubt)
    if failures:
        sys.exit(1)
