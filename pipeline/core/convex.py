"""The model's own limit: the exact optimum of L2-regularised softmax regression, by full-batch L-BFGS.

Softmax regression with an L2 penalty is convex (strictly, for a weight decay above 0): every weight
decay has one best model, and a second-order-like method on the whole training split finds it, with
none of SGD's choices (learning rate, epochs, batch order, early stopping) left to tune. What such an
optimum reaches on validation and test is what the model class can do; a tuned SGD run below it left
accuracy on the table.

The objective is the one SGD minimises in ``pipeline.core.training.fit``: ``torch.optim.SGD(weight_decay
=wd)`` adds ``wd * p`` to the gradient of *every* parameter, biases included, which is the gradient of

    mean cross-entropy + wd / 2 * (||W||^2 + ||b||^2),

so the numbers compare. Computed in float64: the gradient norm at the optimum is then meaningful down to
~1e-10 (float32 stalls near 1e-4). Plain torch, no tracking (``pipeline.steps.convex_optimum`` logs).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import IMAGE_SIZE, NUM_CLASSES


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy plus wd/2 times the squared norm of every parameter (SGD's weight_decay)."""
    penalty = sum(p.pow(2).sum() for p in model.parameters())
    return F.cross_entropy(model(x), y) + weight_decay / 2 * penalty


def gradient_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> float:
    """The Euclidean norm of the objective's gradient over all parameters, by autograd (0 at the optimum)."""
    grads = torch.autograd.grad(objective(model, x, y, weight_decay), list(model.parameters()))
    return torch.cat([g.flatten() for g in grads]).norm().item()


@dataclass
class Optimum:
    weight_decay: float
    model: nn.Module  # float64
    objective: float
    gradient_norm: float
    iterations: int
    converged: bool  # the gradient norm reached the tolerance within max_iter


def zero_model() -> nn.Sequential:
    """The model of ``pipeline.core.models`` in float64, started at 0 (the optimum does not depend on it)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES)).double()
    for p in model.parameters():
        nn.init.zeros_(p)
    return model


def solve(x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int, tolerance: float,
          start: nn.Module | None = None) -> Optimum:
    """Minimise the objective on all of (x, y) (float64 images) with L-BFGS and a strong Wolfe line search.

    ``start`` warm-starts from another weight decay's optimum (a neighbouring problem's solution is close).
    """
    torch.set_num_threads(1)  # as in training: on a shared machine, extra threads made it several times slower
    model = zero_model()
    if start is not None:
        model.load_state_dict(start.state_dict())
    parameters = list(model.parameters())
    size = sum(p.numel() for p in parameters)
    # L-BFGS stops on the largest gradient entry; at tolerance/sqrt(size) the Euclidean norm is <= tolerance
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance / math.sqrt(size), tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(model, x, y, weight_decay)
        loss.backward()
        return loss

    optimizer.step(closure)  # runs up to max_iter iterations, stops at a flat gradient
    norm = gradient_norm(model, x, y, weight_decay)
    with torch.no_grad():
        value = objective(model, x, y, weight_decay).item()
    iterations = optimizer.state[parameters[0]]["n_iter"]  # LBFGS keeps its state under the first parameter
    return Optimum(weight_decay, model, value, norm, iterations, converged=norm <= tolerance)


def solve_path(x: torch.Tensor, y: torch.Tensor, weight_decays, max_iter: int, tolerance: float) -> list[Optimum]:
    """Every weight decay's optimum, strongest first, each warm-started from the previous one."""
    optima, start = [], None
    for wd in sorted(weight_decays, reverse=True):
        optimum = solve(x, y, wd, max_iter, tolerance, start)
        optima.append(optimum)
        start = optimum.model
    return optima


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).double().mean().item()
