"""Several softmax regressions trained side by side: K trials as one stacked layer, one step for all.

A softmax regression is one 784x10 matrix, so a step on a batch of 256 costs almost nothing but fixed
overhead (some twenty small ops, autograd, the optimiser). K models stepping together on the same batch
cost little more than one: stack their weights into one (K, 10, 784) tensor, gather the batch once,
compute all K models' logits with one matrix product (784 x 10K), and give each model its own mean
cross-entropy. The loss summed over the models has, for each model's weights, exactly that model's
gradient (the models share no parameter), and the SGD step applies each model's own learning rate and
weight decay to its own block.

All models see the same batches: one seed's stream of shuffled orders, one order per epoch, drawn as
``pipeline.core.training.fit`` draws them. The models that start together start at its first order, so
each ends exactly where ``fit`` would take it alone, up to float rounding (tests/core/test_stacked.py
checks this against ``fit``). A model that joins later (``refill``) starts where the stream is, and its
config says so (``TrainConfig.shuffle_offset``): ``fit`` with that config reproduces it alone too.

Each model keeps ``fit``'s rules on its own: its own number of epochs, its own early stopping, its own
best epoch; a model whose loss becomes NaN fails alone (``DivergedError``), and ``on_epoch`` may raise to
stop one model (Optuna's pruner) while the others go on. A model that stops leaves the stack, and a new
one may take its place at the next epoch.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import NUM_CLASSES, TrainConfig
from pipeline.core.models import build_model
from pipeline.core.splits import pixels
from pipeline.core.training import DivergedError, FitResult, Tensors, batch_orders

# on_epoch(index, metrics) sees each model's epoch and may raise (an Exception) to stop that model;
# on_end(index, outcome) receives a finished model's FitResult, or the exception that stopped it.
OnEpoch = Callable[[int, dict], None]
OnEnd = Callable[[int, "FitResult | Exception"], None]


@dataclass
class Member:
    """One model of the stack: its settings, its progress and its best weights."""

    index: int  # order of joining: the position of its outcome
    cfg: TrainConfig
    result: FitResult
    weight: torch.Tensor  # its current weights (10, 784) and bias (10,)
    bias: torch.Tensor
    epoch: int = 0
    best_state: dict = field(default_factory=dict)


def check_compatible(cfgs: list[TrainConfig], first: TrainConfig, epochs_drawn: int = 0) -> None:
    """Models step together on the same batches, so they share the batch size and the seed of the batch
    orders, and a model joining after ``epochs_drawn`` orders must say it starts there; the rest may differ."""
    for cfg in cfgs:
        cfg.validate()
        if cfg.keep_last:
            raise ValueError("side-by-side training keeps each model's best epoch; keep_last trains one at a time")
        if cfg.model != "softmax":  # stacking K models as one matrix product is the linear model's
            raise ValueError(f"side-by-side training stacks softmax regressions only; model {cfg.model} trains one "
                             "at a time")
        if (cfg.batch_size, cfg.seed) != (first.batch_size, first.seed):
            raise ValueError(f"side-by-side training needs one batch size and one seed for all models, got batch "
                             f"size {cfg.batch_size} and seed {cfg.seed} beside {first.batch_size} and {first.seed}")
        if cfg.shuffle_offset != epochs_drawn:
            raise ValueError(f"a model joining after {epochs_drawn} epochs' batch orders must have shuffle_offset "
                             f"{epochs_drawn}, got {cfg.shuffle_offset}")
        if cfg.input_dropout or cfg.augment:
            # both draw random numbers per batch and model, which a shared stack cannot reproduce
            raise ValueError("side-by-side training supports neither input_dropout nor augment")


def join(index: int, cfg: TrainConfig) -> Member:
    """A new member, with the initial weights it would have alone."""
    linear = build_model(cfg)[1]
    return Member(index, cfg, FitResult(model=None, best_val_accuracy=-1.0), linear.weight.detach(),
                  linear.bias.detach())


def stack(members: list[Member]):
    """The members' weights as one leaf tensor (K, 10, 784) and one bias (K, 10), and their lr and wd."""
    w = torch.stack([m.weight for m in members]).requires_grad_()
    b = torch.stack([m.bias for m in members]).requires_grad_()
    lr = torch.tensor([m.cfg.lr for m in members]).view(-1, 1, 1)
    wd = torch.tensor([m.cfg.weight_decay for m in members]).view(-1, 1, 1)
    return w, b, lr, wd


def logits_of(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """All K models' logits for the same images, (N, K, 10), from one matrix product."""
    k = w.shape[0]
    return F.linear(x.flatten(1), w.view(k * NUM_CLASSES, -1), b.view(-1)).view(len(x), k, NUM_CLASSES)


def losses_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each model's mean cross-entropy over the same images, (K,): the loss it would have alone."""
    n, k, _ = logits.shape
    # Classes in the second dimension, (N, 10, K), the layout cross_entropy takes for per-position
    # targets: torch's log-softmax over a last dimension of only 10 is slow, and this layout gives
    # bit-identical losses faster (docs/benchmarks.md).
    return F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(n, k), reduction="none").mean(0)


def train_epoch(w, b, lr, wd, x, y, batch_size: int, order: torch.Tensor) -> tuple[list[float], list[int]]:
    """One pass over the training split in ``order`` for all K models at once; per model, the summed loss
    and the correct count."""
    k, flat = w.shape[0], x.flatten(1)
    total_loss = torch.zeros(k)
    correct = torch.zeros(k, dtype=torch.long)
    for idx in order.split(batch_size):
        xb, yb = pixels(flat.index_select(0, idx)), y.index_select(0, idx)  # one gather for all K models
        logits = logits_of(w, b, xb)  # (B, K, 10)
        losses = losses_of(logits, yb)
        w.grad = b.grad = None
        losses.sum().backward()  # the sum's gradient for model k's rows is model k's own gradient
        with torch.no_grad():  # SGD as torch.optim.SGD does it, lr and weight decay per model
            w.sub_(lr * (w.grad + wd * w))
            b.sub_(lr.view(-1, 1) * (b.grad + wd.view(-1, 1) * b))
        total_loss += losses.detach() * len(idx)
        correct += (logits.argmax(dim=2) == yb[:, None]).sum(0)
    return total_loss.tolist(), correct.tolist()  # sums: divided by len(x) in Python, as fit does


@torch.no_grad()
def score(w, b, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's mean cross-entropy and accuracy over a whole split (``training.score`` for K models)."""
    logits = logits_of(w, b, x)
    return losses_of(logits, y), (logits.argmax(dim=2) == y[:, None]).float().mean(0)


def epoch_metrics(w, b, members, data: Tensors, train_loss, train_acc) -> list[dict]:
    """``fit``'s metrics dict of this epoch for each member (each at its own epoch)."""
    val_loss, val_acc = score(w, b, *data.val)
    test_loss, test_acc = score(w, b, *data.test) if any(m.cfg.log_test_curve for m in members) else (None, None)
    out, n = [], len(data.train[1])
    for i, m in enumerate(members):
        metrics = dict(epoch=m.epoch, train_loss=train_loss[i] / n, train_accuracy=train_acc[i] / n,
                       val_loss=val_loss[i].item(), val_accuracy=val_acc[i].item())
        if m.cfg.log_test_curve:
            metrics["test_loss"], metrics["test_accuracy"] = test_loss[i].item(), test_acc[i].item()
        out.append(metrics)
    return out


def final_result(member: Member) -> FitResult:
    """The member's FitResult, its model (``build_model``'s nn.Sequential) holding the best epoch's weights."""
    model = build_model(member.cfg)
    model.load_state_dict(member.best_state)
    member.result.model = model
    return member.result


def advance(member: Member, metrics: dict, w_k, b_k, on_epoch: OnEpoch | None) -> FitResult | Exception | None:
    """``fit``'s per-epoch rules for one member; its outcome if it stops now, else None."""
    result, cfg, epoch = member.result, member.cfg, metrics["epoch"]
    result.history.append(metrics)
    if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])):
        return DivergedError(epoch, metrics, cfg)
    if metrics["val_accuracy"] > result.best_val_accuracy:
        result.best_epoch, result.best_val_accuracy = epoch, metrics["val_accuracy"]
        member.best_state = {"1.weight": w_k.detach().clone(), "1.bias": b_k.detach().clone()}
    if on_epoch is not None:
        try:
            on_epoch(member.index, metrics)
        except Exception as e:  # this member stops (pruned, say); the others go on
            return e
    if cfg.patience and epoch - result.best_epoch >= cfg.patience:
        result.stopped_early = epoch < cfg.epochs
        return final_result(member)
    if epoch == cfg.epochs:
        return final_result(member)
    return None


def fit_stacked(cfgs: list[TrainConfig], data: Tensors, on_epoch: OnEpoch | None = None,
                     on_end: OnEnd | None = None, refill: Callable[[int], TrainConfig | None] | None = None,
                     ) -> list[FitResult | Exception]:
    """Train one model per config side by side; each model's outcome, in the order they joined.

    A model's outcome is its ``FitResult`` (as ``fit`` returns it), the ``DivergedError`` it failed with,
    or the exception its ``on_epoch`` raised. ``on_end`` sees each outcome as soon as that model stops,
    while the others still train; then ``refill(epochs_drawn)`` (if given) may return the config of a
    model to take its place from the next epoch on (None: no more), with ``shuffle_offset=epochs_drawn``,
    so the stack stays full while models drop out. KeyboardInterrupt is not an outcome: it stops them all.
    """
    check_compatible(cfgs, cfgs[0])
    members = [join(i, cfg) for i, cfg in enumerate(cfgs)]
    outcomes: list = [None] * len(cfgs)
    orders, epochs_drawn = batch_orders(cfgs[0], len(data.train[1])), 0
    while members:
        w, b, lr, wd = stack(members)
        for m in members:
            m.epoch += 1
        order = torch.randperm(len(data.train[1]), generator=orders)  # this epoch's, for every member
        epochs_drawn += 1
        train_loss, train_acc = train_epoch(w, b, lr, wd, *data.train, cfgs[0].batch_size, order)
        still = []
        for i, (member, metrics) in enumerate(zip(members, epoch_metrics(w, b, members, data, train_loss, train_acc))):
            member.weight, member.bias = w[i].detach(), b[i].detach()
            outcome = advance(member, metrics, w[i], b[i], on_epoch)
            if outcome is None:
                still.append(member)
                continue
            outcomes[member.index] = outcome
            if on_end is not None:
                on_end(member.index, outcome)
            new = refill(epochs_drawn) if refill is not None else None
            if new is not None:
                check_compatible([new], cfgs[0], epochs_drawn)
                still.append(join(len(outcomes), new))
                outcomes.append(None)
        members = still  # the next epoch restacks the members still training and the newcomers
    return outcomes
