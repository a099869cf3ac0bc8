"""Every knob of the pipeline, in one place, as plain typed objects.

The CLI builds these from its options and hands them to each step; nothing else reads options.
The defaults are the book's seed recipe (d2l §3.7): SGD, lr 0.1, batch 256, 10 epochs.
"""

from dataclasses import asdict, dataclass

CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

# Names through which the steps find each other's outputs in MLflow
PREPARED_ARTIFACT = "prepared"  # the prepare run's artifact folder: runs:/<run_id>/prepared
MODEL_URI_TAG = "pipeline.model_uri"  # the model a train run produced (models:/<model_id>)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None  # where the raw IDX files are; None = search the usual places
    val_size: int = 10_000  # images held out of the 60,000 training images for model selection
    split_seed: int = 0  # seeds the stratified train/validation split
    limit: int = 0  # keep at most this many images per split (0 = all); for smoke runs

    def validate(self) -> None:
        if self.val_size < 1 or self.val_size >= 60_000:
            raise ValueError(f"val_size must be between 1 and 59999, got {self.val_size}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 means all images), got {self.limit}")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.1
    epochs: int = 10  # the maximum: early stopping may end training sooner
    weight_decay: float = 0.0
    batch_size: int = 256
    patience: int = 5  # epochs without a better val accuracy before stopping; 0 = never stop early
    seed: int = 0
    log_test_curve: bool = False  # also measure test accuracy each epoch (the book's plot); never used to choose
    input_dropout: float = 0.0  # remedy for overfitting: drop this fraction of input pixels while training
    augment: bool = False  # remedy for overfitting: random flips and shifts of whole batches

    def validate(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.patience < 0:
            problems.append(f"patience must be >= 0 (0 disables early stopping), got {self.patience}")
        if not 0 <= self.input_dropout < 1:
            problems.append(f"input_dropout must be in [0, 1), got {self.input_dropout}")
        if problems:
            raise ValueError("; ".join(problems))

    def as_params(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Tuning (pipeline/tune.py)

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_SCHEME = "journal:///"  # like sqlite:///: journal:///optuna.log is relative, journal:////tmp/x.log absolute
JOURNAL_SUFFIXES = (".log", ".journal")


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_SCHEME) or ("://" not in url and url.endswith(JOURNAL_SUFFIXES))


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched; learning rate and weight decay on a log scale."""

    lr_low: float = 1e-3
    lr_high: float = 1.0
    epochs_low: int = 5  # the maximum number of epochs of a trial; early stopping works inside it
    epochs_high: int = 100
    wd_low: float = 1e-6  # plus zero, through the use_weight_decay switch (see pipeline/tune.py)
    wd_high: float = 1e-2

    def validate(self) -> None:
        problems = []
        for name, low, high in (("lr", self.lr_low, self.lr_high), ("wd", self.wd_low, self.wd_high)):
            if not (low > 0 and high > 0):
                problems.append(f"{name} bounds are searched on a log scale and must be > 0, got "
                                f"--{name}-low {low} --{name}-high {high}")
            elif low > high:
                problems.append(f"--{name}-low {low} is above --{name}-high {high}")
        if self.epochs_low < 1:
            problems.append(f"--epochs-low must be >= 1, got {self.epochs_low}")
        elif self.epochs_low > self.epochs_high:
            problems.append(f"--epochs-low {self.epochs_low} is above --epochs-high {self.epochs_high}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 20  # trials the study holds when done: finished ones, from earlier runs or other machines, count
    workers: int = 1  # processes on this machine working on the study
    storage: str = DEFAULT_STORAGE  # any Optuna storage URL, or a journal file
    study_name: str = "fashion-mnist-softmax"
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0  # seeds the sampler and every trial's training
    # Early stopping inside each trial. Longer than training's 5: SGD's val accuracy is noisy, and with
    # 5 the good trials stopped near epoch 20 while val accuracy still climbed until about epoch 70.
    patience: int = 15
    batch_size: int = 256
    evaluate: bool = True  # evaluate the best model on test and register it
    heartbeat_interval: int = 10  # seconds; SQL storages only: a trial silent for 2 intervals is failed

    def validate(self) -> None:
        problems = []
        if self.trials < 1:
            problems.append(f"trials must be >= 1, got {self.trials}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            problems.append(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if not self.study_name:
            problems.append("study_name must not be empty")
        if not (is_journal(self.storage) or "://" in self.storage):
            problems.append(
                f"storage {self.storage!r} is neither a database URL (sqlite:///optuna.db, "
                "postgresql://user@host/db, mysql://user@host/db) nor a journal file "
                f"({JOURNAL_SCHEME}optuna.log, or a path ending in {' or '.join(JOURNAL_SUFFIXES)})"
            )
        if self.patience < 0:
            problems.append(f"patience must be >= 0 (0 disables early stopping), got {self.patience}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.heartbeat_interval < 1:
            problems.append(f"heartbeat_interval must be >= 1 second, got {self.heartbeat_interval}")
        if problems:
            raise ValueError("; ".join(problems))
