"""Step ``prepare``: find, check and split the data; log it as datasets, with the prepared file as an artifact.

The next steps read the split from this run's artifact ``runs:/<run_id>/prepared``.
"""

from dataclasses import asdict

import click
import mlflow
import pandas as pd

from pipeline.config import DataConfig
from pipeline.core import figures
from pipeline.core.splits import SPLITS, Splits, prepare_splits
from pipeline.names import (
    CACHE_KEY_TAG,
    CACHE_REUSED_TAG,
    CLASS_COUNTS,
    PREPARED_ARTIFACT,
    RAW_DIGEST_TAG,
    SAMPLES_FIGURE,
)
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.datasets import log_datasets
from pipeline.tracking.runs import log_new_params, runs_killed_at_once
from pipeline.tracking.stores import open_tracking_store


def prepare(cfg: DataConfig) -> Splits:
    """Prepare the splits (or reuse an identical earlier preparation) and log them to the active run."""
    splits, path, info = prepare_splits(cfg)
    log_new_params(asdict(cfg))
    log_new_params({"source": info["source"], **{f"{s}_size": len(splits.arrays(s)[1]) for s in SPLITS}})
    mlflow.set_tags({RAW_DIGEST_TAG: info["raw_digest"], CACHE_KEY_TAG: info["cache_key"],
                     CACHE_REUSED_TAG: info["reused"]})
    mlflow.log_artifact(str(path), artifact_path=PREPARED_ARTIFACT)
    log_datasets(splits, info["source"])
    counts = pd.DataFrame({s: splits.class_counts(s) for s in SPLITS}).rename_axis("class").reset_index()
    mlflow.log_table(counts, artifact_file=CLASS_COUNTS)
    mlflow.log_figure(figures.samples_per_class(splits.train_x, splits.train_y), SAMPLES_FIGURE)
    return splits


@click.command("prepare")
@options_from(DataConfig)
def prepare_command(**options):
    cfg = make_config(DataConfig, options)
    open_tracking_store()
    with mlflow.start_run(run_name="prepare") as run, runs_killed_at_once():
        splits = prepare(cfg)
    sizes = ", ".join(f"{s} {len(splits.arrays(s)[1])}" for s in SPLITS)
    click.echo(f"prepared {sizes}; data URI: runs:/{run.info.run_id}/{PREPARED_ARTIFACT}")
