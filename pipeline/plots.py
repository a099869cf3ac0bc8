"""Figures, as matplotlib ``Figure`` objects that the steps hand to ``mlflow.log_figure``."""

import matplotlib

matplotlib.use("Agg")  # no display on servers or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from pipeline.config import CLASS_NAMES  # noqa: E402


def training_curves(history: list[dict], title: str = "") -> plt.Figure:
    """Loss and accuracies against epoch, like the book's ``Animator`` plot."""
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--"), ("test_loss", ":")):
        if key in history[0]:
            ax_loss.plot(epochs, [m[key] for m in history], style, label=key)
    for key, style in (("train_accuracy", "-"), ("val_accuracy", "--"), ("test_accuracy", ":")):
        if key in history[0]:
            ax_acc.plot(epochs, [m[key] for m in history], style, label=key)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, row_labels: list[str], per_row: int, title: str = "") -> plt.Figure:
    """Show uint8 images (N, 28, 28) in rows of ``per_row``, one label per row."""
    tensor = torch.from_numpy(np.asarray(images)).unsqueeze(1)
    grid = make_grid(tensor, nrow=per_row, padding=2, pad_value=255)
    fig, ax = plt.subplots(figsize=(per_row * 0.8 + 1.5, len(row_labels) * 0.8 + 0.5))
    ax.imshow(grid[0].numpy(), cmap="gray_r")
    ax.set_yticks([30 * i + 15 for i in range(len(row_labels))], row_labels)
    ax.set_xticks([])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def samples_per_class(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> plt.Figure:
    rows = [images[np.flatnonzero(labels == c)[:per_class]] for c in range(len(CLASS_NAMES))]
    return image_grid(np.concatenate(rows), list(CLASS_NAMES), per_class, "samples per class")
