"""Every figure the pipeline draws, as ``matplotlib.figure.Figure`` objects for ``mlflow.log_figure``.

Built with matplotlib's object API: no pyplot, so no global figure list to close, and no backend to
select (a ``Figure`` renders to PNG by itself, on servers and in CI alike).
"""

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from pipeline.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

CURVE_STYLES = {"train": "-", "val": "--", "test": ":"}


def titled(fig: Figure, title: str = "") -> Figure:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- Training (tracking/training.py) ---------------------------------------------------------------------


def training_curves(history: list[dict], title: str = "", kept_epoch: int | None = None) -> Figure:
    """Loss and accuracies against epoch, like the book's ``Animator`` plot; ``kept_epoch`` (the best
    validation epoch, whose model the run keeps) is marked by a vertical line."""
    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, quantity in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, style in CURVE_STYLES.items():
            key = f"{split}_{quantity}"
            if key in history[0]:
                ax.plot(epochs, [m[key] for m in history], style, label=key)
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="tab:green", linestyle=":", label=f"kept epoch {kept_epoch}")
        ax.set(xlabel="epoch", ylabel=quantity)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return titled(fig, title)


# --- Data (steps/prepare.py) and evaluation (tracking/evaluation.py) ------------------------------------


def samples_per_class(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> Figure:
    """The first ``per_class`` images of each class, one row per class."""
    cell = IMAGE_SIZE + 2  # each image framed by a 1-pixel line
    cells = np.full((NUM_CLASSES, per_class, cell, cell), 255, dtype=np.uint8)
    for c in range(NUM_CLASSES):
        chosen = images[np.flatnonzero(labels == c)[:per_class]]
        cells[c, :len(chosen), 1:-1, 1:-1] = chosen
    grid = cells.transpose(0, 2, 1, 3).reshape(NUM_CLASSES * cell, per_class * cell)  # rows of classes
    fig = Figure(figsize=(per_class * 0.8 + 1.5, NUM_CLASSES * 0.8 + 0.5))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray_r")
    ax.set_yticks([cell * i + cell // 2 for i in range(NUM_CLASSES)], CLASS_NAMES)
    ax.set_xticks([])
    ax.set_title("samples per class")
    return titled(fig)


def confusion_figure(cm: np.ndarray) -> Figure:
    fig = Figure(figsize=(15, 6.5))
    normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for ax, matrix, title, fmt in zip(fig.subplots(1, 2), (cm, normalised), ("counts", "row-normalised"), ("d", ".2f")):
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
        ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
        ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({title})")
    return titled(fig)


def confident_mistakes(images, y_true, probs: np.ndarray, count: int = 16) -> Figure:
    """The wrong predictions the model was most sure of, labelled 'true -> predicted (p)'."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:count]
    fig = Figure(figsize=(count * 0.9, 4.4))
    axes = fig.subplots(2, (count + 1) // 2)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{CLASS_NAMES[y_true[i]]}\n-> {CLASS_NAMES[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})", fontsize=7)
    return titled(fig, "most confident mistakes (true -> predicted)")


# --- The stability experiment (steps/stability.py) -------------------------------------------------


def plot_marking_nonfinite(ax, x, values: pd.Series, label: str, style: str = "o-", cross_size: float = 10) -> None:
    """Plot the finite values as a line and each inf/NaN as a red cross on the top edge of the axes."""
    finite = values.map(math.isfinite)
    ax.plot(x[finite], values[finite], style, color="tab:orange", label=label)
    if (~finite).any():
        top = ax.get_ylim()[1]
        ax.plot(x[~finite], [top] * int((~finite).sum()), "rx", markersize=cross_size, clip_on=False,
                label=f"{label}: inf / NaN")


def loss_vs_scale(sweep: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.plot(sweep["scale"], sweep["stable_loss"], "s-", label="stable (log-sum-exp)")
    plot_marking_nonfinite(ax, sweep["scale"], sweep["naive_loss"], "naive (softmax, then log)")
    ax.set(xscale="log", yscale="log", xlabel="logit scale factor", ylabel="mean cross-entropy",
           title="cross-entropy of scaled logits (float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return titled(fig)


def training_loss(race: pd.DataFrame, lr: float, first_nan: int | None) -> Figure:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.plot(race["step"], race["stable_loss"], label="stable (log-sum-exp)")
    plot_marking_nonfinite(ax, race["step"], race["naive_loss"], "naive (softmax, then log)", style="-", cross_size=4)
    if first_nan is not None:
        ax.axvline(first_nan, color="red", linestyle=":", label=f"first NaN: step {first_nan}")
    ax.set(yscale="log", xlabel="SGD step", ylabel="training loss (batch)", title=f"training with lr {lr:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return titled(fig)


# --- Reports (steps/report.py) ---------------------------------------------------------------------


def accuracy_curves(names: list[str], run_curves: list[dict], title: str) -> Figure:
    """Validation accuracy of every run (solid) and, where logged, its test accuracy (dotted, same colour)."""
    fig = Figure(figsize=(10, 5.5))
    ax = fig.subplots()
    palette = colormaps["tab20" if len(names) > 10 else "tab10"].colors  # distinct colours for up to 20 runs
    for i, (name, c) in enumerate(zip(names, run_curves)):
        colour = palette[i % len(palette)]
        if c["val"]:
            ax.plot(*zip(*c["val"]), color=colour, label=name, linewidth=1.2)
        if c["test"]:
            ax.plot(*zip(*c["test"]), ":", color=colour, linewidth=1.2)
    ax.set(xlabel="epoch", ylabel="accuracy",
           title=f"{title}\nsolid: validation accuracy, dotted: test accuracy (where the run logged it)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no run logged accuracy curves", ha="center", va="center", transform=ax.transAxes)
    return titled(fig)


# --- Optuna studies (steps/tune.py) ----------------------------------------------------------------


def optimization_history(trials: pd.DataFrame) -> Figure:
    """Each finished trial's objective value and the best so far, by trial number."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(trials["number"], trials["value"], "o", alpha=0.6, label="trial")
    ax.plot(trials["number"], trials["value"].cummax(), "-", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="best val accuracy", title="optimization history")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return titled(fig)


def intermediate_values(curves: dict[int, dict[int, float]]) -> Figure:
    """Every trial's per-epoch val accuracy, as the pruner saw it."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for curve in curves.values():
        ax.plot(list(curve), list(curve.values()), alpha=0.7, linewidth=1)
    ax.set(xlabel="epoch", ylabel="val accuracy", title="intermediate values (one line per trial)")
    ax.grid(True, alpha=0.3)
    return titled(fig)


def param_slices(trials: pd.DataFrame, params: list[str], log_scale: set[str]) -> Figure:
    """The objective against each parameter, one panel per parameter."""
    fig = Figure(figsize=(4 * len(params), 4))
    for ax, name in zip(np.ravel(fig.subplots(1, len(params))), params):
        ax.scatter(trials[name], trials["value"], c=trials["number"], cmap="Blues", edgecolors="grey")
        ax.set(xlabel=name, ylabel="best val accuracy", xscale="log" if name in log_scale else "linear")
        ax.grid(True, alpha=0.3)
    return titled(fig, "objective by parameter (darker: later trials)")


def parallel_coordinate(trials: pd.DataFrame, params: list[str], log_scale: set[str]) -> Figure:
    """One line per trial across the parameters (each scaled to its range), coloured by its objective."""
    scaled = pd.DataFrame({p: np.log10(trials[p]) if p in log_scale else trials[p] for p in params})
    scaled = (scaled - scaled.min()) / (scaled.max() - scaled.min()).replace(0, 1)
    colour = colormaps["viridis"]((trials["value"] - trials["value"].min()) / (np.ptp(trials["value"]) or 1))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for row, c in zip(scaled.itertuples(index=False), colour):
        ax.plot(params, row, color=c, alpha=0.8)
    ax.set(ylabel="position in the searched range (log for lr, weight_decay)",
           title="parallel coordinates (yellow: best val accuracy)")
    return titled(fig)


def param_importances(importances: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.6 * len(importances) + 1.5))
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="hyperparameter importances")
    return titled(fig)
