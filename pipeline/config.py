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
