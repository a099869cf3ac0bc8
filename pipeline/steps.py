"""The pipeline's steps, each one MLflow run: prepare the data, train a model (evaluate: evaluate.py).

Each function expects to be called inside ``mlflow.start_run()`` (the CLI opens it; under
``mlflow run`` that resumes the run MLflow created) and records everything on the active run.
"""

from dataclasses import asdict

import mlflow
import pandas as pd
from tqdm import tqdm

from pipeline import plots, tracking
from pipeline.config import MODEL_URI_TAG, PREPARED_ARTIFACT, DataConfig, TrainConfig
from pipeline.data import SPLITS, Splits, prepare_splits
from pipeline.model import build_model
from pipeline.train import DivergedError, FitResult, Tensors, fit


def prepare(cfg: DataConfig) -> Splits:
    """Find, check and split the data; log it as datasets plus the prepared file as an artifact."""
    splits, path, info = prepare_splits(cfg)
    tracking.log_new_params(asdict(cfg))
    tracking.log_new_params({"source": info["source"], **{f"{s}_size": len(splits.arrays(s)[1]) for s in SPLITS}})
    mlflow.set_tags({"pipeline.cache_key": info["cache_key"], "pipeline.cache_reused": info["reused"]})
    mlflow.log_artifact(str(path), artifact_path=PREPARED_ARTIFACT)
    tracking.log_datasets(splits, info["source"])
    counts = pd.DataFrame({s: splits.class_counts(s) for s in SPLITS}).rename_axis("class").reset_index()
    mlflow.log_table(counts, artifact_file="class_counts.json")
    mlflow.log_figure(plots.samples_per_class(splits.train_x, splits.train_y), "samples.png")
    return splits


def load_data(data_uri: str) -> Splits:
    """The prepared splits named by ``data_uri``; with none given, prepare the default ones here."""
    if data_uri:
        return tracking.fetch_prepared(data_uri)
    splits = prepare_splits(DataConfig())[0]
    tracking.log_datasets(splits, "prepared in this run with the default settings")
    return splits


def train(cfg: TrainConfig, splits: Splits, tensors: Tensors | None = None,
          progress: bool = True, on_epoch=None) -> tuple[FitResult, object]:
    """Train the seed model with ``cfg`` and log params, curves, best epoch and the model.

    ``on_epoch`` lets a caller (Optuna's pruner) see each epoch after it is logged. Returns the fit
    result and MLflow's ModelInfo. A diverging run is tagged with the reason and raises, so the run
    ends FAILED with a clear message.
    """
    tensors = tensors or Tensors.from_splits(splits)
    tracking.log_new_params(cfg.as_params())
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress, leave=False)

    def after_epoch(metrics: dict) -> None:
        # synchronous, so a crash loses no finished epoch (asynchronous logging measured no faster here)
        tracking.log_epoch(metrics)
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_accuracy")})
        if on_epoch is not None:
            on_epoch(metrics)

    try:
        result = fit(build_model(cfg.seed), tensors, cfg, on_epoch=after_epoch)
    except DivergedError as e:
        tracking.log_epoch(e.metrics)  # the NaN/inf epoch shows in the curves too
        mlflow.set_tag("pipeline.failure", e.message)
        raise
    finally:
        bar.close()
    mlflow.log_figure(plots.training_curves(result.history, "softmax regression"), "curves.png")
    model_info = tracking.log_model(result.model, splits.val_x[:4], step=result.best_epoch)
    summary = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
               "epochs_run": len(result.history)}
    mlflow.log_metrics(summary, model_id=model_info.model_id)
    mlflow.set_tags({"pipeline.stopped_early": result.stopped_early, MODEL_URI_TAG: model_info.model_uri})
    return result, model_info
