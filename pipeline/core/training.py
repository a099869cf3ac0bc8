"""The training loop: plain PyTorch, no tracking. ``pipeline.tracking.training`` adds MLflow around it.

Why it is fast: the whole training split already sits in memory as one tensor, so a batch is a
single index into it. The book's DataLoader instead decodes, converts and collates 256 PIL images per
batch in worker processes, which costs far more than the 784x10 matrix product itself.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.core.splits import Splits, pixels, to_tensor
from pipeline.errors import PipelineError


class DivergedError(PipelineError):
    """The loss became NaN or infinite: the learning rate, or the weight decay with it, is too large."""

    def __init__(self, epoch: int, metrics: dict, cfg: TrainConfig):
        self.epoch, self.metrics = epoch, metrics
        # SGD's decay step multiplies the weights by (1 - lr * weight_decay): from a product of 1 on
        # it overshoots zero every step, and above 2 it grows them, whatever the gradient does.
        decay = cfg.lr * cfg.weight_decay
        advice = (f"lower the weight decay or the learning rate (lr x weight decay = {decay:g}; keep it well "
                  "below 1)" if decay >= 1 else "lower the learning rate")
        super().__init__(
            f"training diverged at epoch {epoch}: loss is {metrics.get('train_loss')} "
            f"(val loss {metrics.get('val_loss')}) with lr {cfg.lr:g} and weight decay {cfg.weight_decay:g}; "
            f"{advice}"
        )


@dataclass
class Tensors:
    """The prepared splits as tensors (N, 1, 28, 28) with int64 labels.

    Validation and test images are model-ready float32 pixels in [0, 1]: each is scored whole, every
    epoch. The training images stay uint8 and become pixels a batch at a time (``pixels``), exactly as
    they would whole: no float copy of the split (the uint8 tensor shares the prepared array), and each
    batch's gather from random rows reads a quarter of the bytes (docs/benchmarks.md).
    """

    train: tuple[torch.Tensor, torch.Tensor]  # uint8 images
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def from_splits(cls, splits: Splits) -> "Tensors":
        def pair(split, convert=to_tensor):
            x, y = splits.arrays(split)
            return convert(x), torch.from_numpy(y)

        uint8_images = lambda x: torch.from_numpy(x).unsqueeze(1)  # noqa: E731
        return cls(train=pair("train", uint8_images), val=pair("val"), test=pair("test"))

    def train_pixels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training split as float pixels, for code that uses it at once rather than by batches."""
        x, y = self.train
        return pixels(x), y


@dataclass
class FitResult:
    model: nn.Module  # holds the best epoch's weights
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split in one pass (the validation pass of each epoch)."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def batch_augmentation():
    # imported here: torchvision adds to the memory of every process that imports it, and only augmentation needs it
    from torchvision.transforms import v2

    # Light, label-preserving changes; v2 transforms draw one set of parameters per call, so a whole
    # batch is flipped/shifted together, which keeps augmentation as cheap as a single tensor op.
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1))])


def batch_orders(cfg: TrainConfig, n: int) -> torch.Generator:
    """The generator of each epoch's shuffled order, past the first ``cfg.shuffle_offset`` epochs' orders.

    Trials trained side by side share one stream of orders (one gather for all); a trial that joins the
    stack late starts further down it, and records where (``shuffle_offset``) so it can be reproduced alone.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.shuffle_offset):
        torch.randperm(n, generator=generator)  # as train_epoch draws each epoch's order
    return generator


def train_epoch(model, x, y, optimizer, cfg: TrainConfig, generator, augment=None) -> tuple[float, float]:
    """One pass over the shuffled training split; returns the running mean loss and accuracy."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()  # log-sum-exp inside: stable for any logits
    total_loss = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    for idx in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
        xb, yb = pixels(x.index_select(0, idx)), y.index_select(0, idx)  # index_select = x[idx], faster
        if augment is not None:
            xb = augment(xb)
        if cfg.input_dropout:
            xb = F.dropout(xb, cfg.input_dropout, training=True)
        logits = model(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(dim=1) == yb).sum()
    return total_loss.item() / len(x), correct.item() / len(x)


def fit(model: nn.Module, data: Tensors, cfg: TrainConfig,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train with SGD, early-stop on validation accuracy and return the best epoch's weights (the last
    epoch's with ``keep_last``).

    ``on_epoch`` receives each epoch's metrics (for logging, progress bars and Optuna's pruner); it
    may raise to stop training.
    """
    cfg.validate()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = batch_orders(cfg, len(data.train[1]))
    augment = batch_augmentation() if cfg.augment else None
    result = FitResult(model=model, best_val_accuracy=-1.0)
    best_state = None
    for epoch in range(1, cfg.epochs + 1):
        train_loss, train_acc = train_epoch(model, *data.train, optimizer, cfg, generator, augment)
        val_loss, val_acc = score(model, *data.val)
        metrics = dict(epoch=epoch, train_loss=train_loss, train_accuracy=train_acc,
                       val_loss=val_loss, val_accuracy=val_acc)
        if cfg.log_test_curve:  # the book's test curve; only ever plotted, never used to choose
            metrics["test_loss"], metrics["test_accuracy"] = score(model, *data.test)
        result.history.append(metrics)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise DivergedError(epoch, metrics, cfg)
        if val_acc > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(metrics)
        if cfg.patience and epoch - result.best_epoch >= cfg.patience:
            result.stopped_early = epoch < cfg.epochs
            break
    if cfg.keep_last:  # the model as training left it: "best" names the kept epoch, which is the last
        result.best_epoch, result.best_val_accuracy = len(result.history), result.history[-1]["val_accuracy"]
    else:
        model.load_state_dict(best_state)
    return result
