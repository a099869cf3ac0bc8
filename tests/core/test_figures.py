"""The training curves mark the epoch whose model a run keeps."""

from pipeline.core.figures import training_curves

HISTORY = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.1 * (e > 3), "train_accuracy": 0.5 + 0.05 * e,
            "val_accuracy": 0.5 + 0.05 * min(e, 3)} for e in range(1, 7)]


def marks(figure) -> list[tuple[str, list]]:
    """The labelled vertical lines of each plot: (label, x values)."""
    return [(line.get_label(), list(line.get_xdata())) for ax in figure.axes for line in ax.get_lines()
            if line.get_label().startswith("kept epoch")]


def test_the_kept_epoch_is_marked_on_both_plots():
    assert marks(training_curves(HISTORY, kept_epoch=3)) == [("kept epoch 3", [3, 3])] * 2


def test_without_a_kept_epoch_nothing_is_marked():
    assert marks(training_curves(HISTORY)) == []
