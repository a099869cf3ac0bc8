"""A logged model on the untouched test split: accuracy with its interval, loss, per-class table, figures.

This is the only place the test split is used to *report* (the optional test curve in training is only
plotted); nothing is ever chosen by test accuracy. Every test accuracy comes with its 95% Wilson interval
(``pipeline.core.stats``), and the per-image predictions are kept (``test_predictions.npz``) so that
the report can compare two models on the same images with a paired test.
"""

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core import figures
from pipeline.core.metrics import confusion_matrix, per_class_table, predict_logits
from pipeline.core.splits import Splits, array_digest
from pipeline.core.stats import accuracy_with_interval
from pipeline.names import (
    CONFUSION_FIGURE,
    MISTAKES_FIGURE,
    PER_CLASS_CSV,
    PER_CLASS_TABLE,
    TEST_DIGEST_TAG,
    TEST_PREDICTIONS,
)
from pipeline.tracking.logged_models import logged_model_id
from pipeline.tracking.safe_loading import load_model


def evaluate_on_test(model_uri: str, splits: Splits, model: torch.nn.Module | None = None) -> dict:
    """Evaluate ``model_uri`` on the test split and log metrics, table and figures to the active run.

    The metrics are also linked to the logged model, so the MLflow UI shows test accuracy beside it.
    ``model`` is the loaded model when the caller already has it.
    """
    model = model if model is not None else load_model(model_uri)
    logits = predict_logits(model, splits.test_x)
    probs = F.softmax(logits, dim=1).numpy()
    y_pred = probs.argmax(axis=1)
    metrics = {**accuracy_with_interval(splits.test_y, y_pred),
               "test_loss": F.cross_entropy(logits, torch.from_numpy(splits.test_y)).item()}
    table = per_class_table(splits.test_y, y_pred)
    mlflow.log_metrics(metrics, model_id=logged_model_id(model_uri))
    log_predictions(splits, y_pred)
    mlflow.log_table(table, artifact_file=PER_CLASS_TABLE)
    mlflow.log_text(table.to_csv(index=False), PER_CLASS_CSV)
    mlflow.log_figure(figures.confusion_figure(confusion_matrix(splits.test_y, y_pred)), CONFUSION_FIGURE)
    mlflow.log_figure(figures.confident_mistakes(splits.test_x, splits.test_y, probs), MISTAKES_FIGURE)
    return {**metrics, "per_class": table, "predictions": y_pred}


def log_predictions(splits: Splits, y_pred: np.ndarray) -> None:
    """The predicted and true label of every test image (20 KB), and a digest of the test images they
    are for: the report's paired test compares two runs only when the digests match."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TEST_PREDICTIONS
        np.savez(path, predicted=y_pred.astype(np.uint8), labels=splits.test_y.astype(np.uint8))
        mlflow.log_artifact(str(path))
    mlflow.set_tag(TEST_DIGEST_TAG, array_digest(splits.test_x, splits.test_y))
