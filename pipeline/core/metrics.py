"""Test-set measurements, plain numpy and torch: predictions, the confusion matrix, per-class scores."""

import numpy as np
import pandas as pd
import torch

from pipeline.config import CLASS_NAMES, NUM_CLASSES
from pipeline.core.splits import to_tensor


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """Logits for uint8 images (N, 28, 28), scaled like training (a loaded pt2 model has no eval mode)."""
    return model(to_tensor(images))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(y_true * NUM_CLASSES + y_pred, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


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
