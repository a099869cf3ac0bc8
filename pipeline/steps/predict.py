"""Command ``predict``: the most likely classes for image files (PNG/JPEG) or for test images."""

import sys
from pathlib import Path

import click
import numpy as np

from pipeline.config import CLASS_NAMES, DataInput, ModelInput
from pipeline.core.photos import read_photo, top_k, unsure_reasons
from pipeline.errors import PipelineError
from pipeline.steps.options import options_from
from pipeline.tracking.datasets import load_data
from pipeline.tracking.safe_loading import load_model


@click.command("predict")
@options_from(ModelInput, DataInput)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--test", "test_count", type=click.IntRange(min=0), default=0,
              help="Also predict the first N test images.")
def predict_command(model_uri, data, images, test_count):
    """Prints the three most likely classes of each image (PNG/JPEG, any size) or test image."""
    if not images and not test_count:
        raise click.UsageError("give image files and/or --test N")
    model = load_model(model_uri)
    names, arrays, doubts, failures = [], [], [], 0
    for path in images:
        try:
            photo = read_photo(path)
        except PipelineError as e:  # one line, and on to the next image
            click.echo(f"error: {e.message}", err=True)
            failures += 1
            continue
        names.append(str(path))
        arrays.append(photo.pixels)
        doubts.append(photo.doubts)
    if test_count:
        splits = load_data(data)
        arrays.extend(splits.test_x[:test_count])
        names.extend(f"test[{i}] (true: {CLASS_NAMES[y]})" for i, y in enumerate(splits.test_y[:test_count]))
        doubts.extend([] for _ in splits.test_y[:test_count])
    if arrays:
        for name, top, photo_doubts in zip(names, top_k(model, np.stack(arrays)), doubts):
            reasons = unsure_reasons(top, photo_doubts)
            doubt = f"  (unsure: {'; '.join(reasons)})" if reasons else ""
            click.echo(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top) + doubt)
    if failures:
        sys.exit(1)
