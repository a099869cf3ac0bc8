"""Evaluation on the untouched test split: accuracy, loss, a per-class table and two figures.

This is the only place the test split is used to *report* (the optional test curve in training is
only plotted); nothing is ever chosen by test accuracy.
"""

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import plots  # noqa: F401 (selects matplotlib's headless backend)
from pipeline.config import CLASS_NAMES, NUM_CLASSES
from pipeline.data import Splits, to_tensor
from pipeline.errors import PipelineError


def load_model(model_uri: str) -> torch.nn.Module:
    """Load a logged model from runs:/..., models:/name@alias, models:/<model_id> or a path."""
    try:
        return mlflow.pytorch.load_model(model_uri)
    except Exception as e:  # MLflow raises many types for a bad URI: not found, bad scheme, ...
        raise PipelineError(
            f"cannot load model '{model_uri}' ({type(e).__name__}: {e}); use runs:/<run_id>/model, "
            "models:/<name>@<alias>, models:/<name>/<version> or models:/<model_id>"
        )


def logged_model_id(model_uri: str) -> str | None:
    """The MLflow 3 LoggedModel id behind a model URI, so metrics can be linked to the model."""
    return mlflow.models.get_model_info(model_uri).model_id


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    return model(to_tensor(images))


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, built from the confusion matrix."""
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return pd.DataFrame({"class": CLASS_NAMES, "precision": precision, "recall": recall,
                         "f1": f1, "support": support})


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(y_true * NUM_CLASSES + y_pred, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def confusion_figure(cm: np.ndarray) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for ax, matrix, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({title})")
    fig.tight_layout()
    return fig


def confident_mistakes_figure(images, y_true, probs: np.ndarray, count: int = 16) -> plt.Figure:
    """The wrong predictions the model was most sure of, labelled 'true -> predicted (p)'."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:count]
    fig, axes = plt.subplots(2, (count + 1) // 2, figsize=(count * 0.9, 4.4))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{CLASS_NAMES[y_true[i]]}\n-> {CLASS_NAMES[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})", fontsize=7)
    fig.suptitle("most confident mistakes (true -> predicted)")
    fig.tight_layout()
    return fig


def evaluate_step(model_uri: str, splits: Splits, model: torch.nn.Module | None = None) -> dict:
    """Evaluate ``model_uri`` on the test split and log metrics, table and figures to the active run.

    The metrics are also linked to the logged model, so the MLflow UI shows test accuracy beside it.
    ``model`` is the loaded model when the caller already has it.
    """
    model = model if model is not None else load_model(model_uri)
    logits = predict_logits(model, splits.test_x)
    labels = torch.from_numpy(splits.test_y)
    probs = F.softmax(logits, dim=1).numpy()
    y_pred = probs.argmax(axis=1)
    metrics = {"test_accuracy": float((y_pred == splits.test_y).mean()),
               "test_loss": F.cross_entropy(logits, labels).item()}
    table = per_class_table(splits.test_y, y_pred)
    mlflow.log_metrics(metrics, model_id=logged_model_id(model_uri))
    mlflow.log_table(table, artifact_file="per_class.json")
    mlflow.log_text(table.to_csv(index=False), "per_class.csv")
    mlflow.log_figure(confusion_figure(confusion_matrix(splits.test_y, y_pred)), "confusion_matrix.png")
    mlflow.log_figure(confident_mistakes_figure(splits.test_x, splits.test_y, probs), "confident_mistakes.png")
    plt.close("all")
    return {**metrics, "per_class": table, "predictions": y_pred}
