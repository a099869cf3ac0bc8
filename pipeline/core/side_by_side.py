"""Several softmax regressions trained side by side: K trials as one 784x(10K) linear layer.

A softmax regression is one 784x10 matrix, so a step on a batch of 256 costs almost nothing but fixed
overhead (the gather, some twenty small ops, autograd, the optimiser). K models trained on the *same*
batches cost little more than one: stack their weights into one (10K)x784 layer, compute all logits in
one matrix product, and give each model its own mean cross-entropy. The loss summed over the models has,
for each model's weights, exactly that model's gradient (the models share no parameter), and the SGD
step applies each model's own learning rate and weight decay to its own rows. So with the same seed (same
initial weights, same batch order) each model ends exactly where ``pipeline.core.training.fit`` would
take it alone, up to float rounding: tests/test_side_by_side.py checks this against ``fit``.

Each model keeps ``fit``'s rules on its own: its own number of epochs, its own early stopping, its own
best epoch; a model whose loss becomes NaN fails alone (``DivergedError``), and ``on_epoch`` may raise to
stop one model (Optuna's pruner) while the others go on. Models that stop are removed from the stack.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.config import NUM_CLASSES, TrainConfig
from pipeline.core.model import build_model
from pipeline.core.training import DivergedError, FitResult, Tensors

# on_epoch(index, metrics) sees each model's epoch and may raise (an Exception) to stop that model;
# on_end(index, outcome) receives a finished model's FitResult, or the exception that stopped it.
OnEpoch = Callable[[int, dict], None]
OnEnd = Callable[[int, "FitResult | Exception"], None]


@dataclass
class Member:
    """One model of the stack: its settings, its progress, and its best weights so far."""

    index: int  # position in the list of configs given to fit_side_by_side
    cfg: TrainConfig
    result: FitResult
    best_state: dict = field(default_factory=dict)


def check_compatible(cfgs: list[TrainConfig]) -> None:
    """Models share batches, so they must share what decides the batches; the rest may differ."""
    for cfg in cfgs:
        cfg.validate()
    shared = {(cfg.seed, cfg.batch_size) for cfg in cfgs}
    if len(shared) > 1:
        raise ValueError(f"side-by-side training needs one seed and batch size for all models, got {shared}")
    if any(cfg.input_dropout or cfg.augment for cfg in cfgs):
        # both draw random numbers per batch and model, which a shared stack cannot reproduce
        raise ValueError("side-by-side training supports neither input_dropout nor augment")


def stack(members: list[Member], weights: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """The members' weights as one leaf tensor (K, 10, 784) and one bias (K, 10), and their lr and wd."""
    w = torch.stack([weights[m.index][0] for m in members]).requires_grad_()
    b = torch.stack([weights[m.index][1] for m in members]).requires_grad_()
    lr = torch.tensor([m.cfg.lr for m in members]).view(-1, 1, 1)
    wd = torch.tensor([m.cfg.weight_decay for m in members]).view(-1, 1, 1)
    return w, b, lr, wd


def logits_of(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """All K models' logits for a batch, (N, K, 10), from one matrix product."""
    k = w.shape[0]
    return F.linear(x.flatten(1), w.view(k * NUM_CLASSES, -1), b.view(-1)).view(len(x), k, NUM_CLASSES)


def losses_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each model's mean cross-entropy over the batch, (K,): the loss it would have alone."""
    n, k, c = logits.shape
    return F.cross_entropy(logits.reshape(n * k, c), y.repeat_interleave(k), reduction="none").view(n, k).mean(0)


def train_epoch(w, b, lr, wd, x, y, batch_size: int, generator) -> tuple[list[float], list[int]]:
    """One pass over the shuffled training split for all models; per model, the summed loss and correct count."""
    total_loss = torch.zeros(w.shape[0])
    correct = torch.zeros(w.shape[0], dtype=torch.long)
    for idx in torch.randperm(len(x), generator=generator).split(batch_size):
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        logits = logits_of(w, b, xb)
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


def epoch_metrics(w, b, members, data: Tensors, epoch: int, train_loss, train_acc) -> list[dict]:
    """``fit``'s metrics dict of this epoch for each member."""
    val_loss, val_acc = score(w, b, *data.val)
    test_loss, test_acc = score(w, b, *data.test) if any(m.cfg.log_test_curve for m in members) else (None, None)
    out, n = [], len(data.train[1])
    for i, m in enumerate(members):
        metrics = dict(epoch=epoch, train_loss=train_loss[i] / n, train_accuracy=train_acc[i] / n,
                       val_loss=val_loss[i].item(), val_accuracy=val_acc[i].item())
        if m.cfg.log_test_curve:
            metrics["test_loss"], metrics["test_accuracy"] = test_loss[i].item(), test_acc[i].item()
        out.append(metrics)
    return out


def finish(member: Member) -> FitResult:
    """The member's FitResult, its model (``build_model``'s nn.Sequential) holding the best epoch's weights."""
    model = build_model(member.cfg.seed)
    model.load_state_dict(member.best_state)
    member.result.model = model
    return member.result


def advance(member: Member, metrics: dict, w_k, b_k, on_epoch: OnEpoch | None) -> FitResult | Exception | None:
    """``fit``'s per-epoch rules for one member; its outcome if it stops now, else None."""
    result, cfg, epoch = member.result, member.cfg, metrics["epoch"]
    result.history.append(metrics)
    if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])):
        return DivergedError(epoch, metrics)
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
        return finish(member)
    if epoch == cfg.epochs:
        return finish(member)
    return None


def fit_side_by_side(cfgs: list[TrainConfig], data: Tensors, on_epoch: OnEpoch | None = None,
                     on_end: OnEnd | None = None) -> list[FitResult | Exception]:
    """Train one model per config on the same batches; each model's outcome, in the order of ``cfgs``.

    A model's outcome is its ``FitResult`` (as ``fit`` returns it), the ``DivergedError`` it failed with,
    or the exception its ``on_epoch`` raised. ``on_end`` sees each outcome as soon as that model stops,
    while the others still train. KeyboardInterrupt is not an outcome: it stops them all.
    """
    check_compatible(cfgs)
    torch.set_num_threads(1)  # as in fit: the small ops gain nothing from threads that wait for each other
    models = {i: build_model(cfg.seed) for i, cfg in enumerate(cfgs)}  # each starts where it would alone
    weights = {i: (m[1].weight.detach(), m[1].bias.detach()) for i, m in models.items()}
    members = [Member(i, cfg, FitResult(model=models[i], best_val_accuracy=-1.0)) for i, cfg in enumerate(cfgs)]
    outcomes: list = [None] * len(cfgs)
    generator = torch.Generator().manual_seed(cfgs[0].seed)
    epoch = 0
    while members:
        epoch += 1
        w, b, lr, wd = stack(members, weights)
        train_loss, train_acc = train_epoch(w, b, lr, wd, *data.train, cfgs[0].batch_size, generator)
        per_member = epoch_metrics(w, b, members, data, epoch, train_loss, train_acc)
        still = []
        for i, (member, metrics) in enumerate(zip(members, per_member)):
            weights[member.index] = (w[i].detach(), b[i].detach())
            outcome = advance(member, metrics, w[i], b[i], on_epoch)
            if outcome is None:
                still.append(member)
                continue
            outcomes[member.index] = outcome
            if on_end is not None:
                on_end(member.index, outcome)
        members = still  # the next epoch restacks only the members still training
    return outcomes
