"""The model's own limit: the exact optimum of L2-regularised softmax regression, by full-batch L-BFGS.

Softmax regression with an L2 penalty is convex (strictly, for a weight decay above 0): every weight
decay has one best model, and a second-order-like method on the whole training split finds it, with
none of SGD's choices (learning rate, epochs, batch order, early stopping) left to tune. What such an
optimum reaches on validation and test is what the model class can do; a tuned SGD run below it left
accuracy on the table.

The objective is the one SGD minimises in ``pipeline.core.training.fit``: ``torch.optim.SGD(weight_decay
=wd)`` adds ``wd * p`` to the gradient of *every* parameter, biases included, which is the gradient of

    mean cross-entropy + wd / 2 * (||W||^2 + ||b||^2),

so the numbers compare. Computed in float64: L-BFGS drives the gradient norm down to ~1e-8 on the whole
training split (float32 stalls near 1e-4). Plain torch, no tracking (``pipeline.steps.convex_optimum`` logs).
"""

import itertools
import math
from collections.abc import Callable
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


HISTORY = 100  # curvature pairs L-BFGS remembers: 7,850 parameters, so a long memory costs nothing
CHECK_EVERY = 20  # iterations between two measurements of the gradient norm (each costs a full pass)


def solve(x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int, tolerance: float,
          start: nn.Module | None = None) -> Optimum:
    """Minimise the objective on all of (x, y) (float64 images) with L-BFGS and a strong Wolfe line search.

    Stops when the objective's gradient norm is at most ``tolerance`` (converged) or after ``max_iter``
    iterations (not converged). ``start`` warm-starts from another weight decay's optimum (a neighbouring
    problem's solution is close).
    """
    model = zero_model()
    if start is not None:
        model.load_state_dict(start.state_dict())
    parameters = list(model.parameters())
    # L-BFGS minimises the *sum* over images (N times the mean, the same minimiser): torch discards a
    # curvature pair when s.y <= 1e-10, an absolute threshold that the mean's small gradients fall under
    # near the optimum, and with its memory emptied L-BFGS crawls. Its own stop, on the largest gradient
    # entry, is set so that it implies ours (Euclidean norm of the mean's gradient <= tolerance).
    scale = len(y)
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=CHECK_EVERY, history_size=HISTORY,
                                  tolerance_grad=scale * tolerance / math.sqrt(sum(p.numel() for p in parameters)),
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = scale * objective(model, x, y, weight_decay)
        loss.backward()
        return loss

    def iterations() -> int:
        return optimizer.state[parameters[0]].get("n_iter", 0)  # LBFGS keeps its state under the first parameter

    norm = gradient_norm(model, x, y, weight_decay)
    while norm > tolerance and iterations() < max_iter:
        optimizer.param_groups[0]["max_iter"] = min(CHECK_EVERY, max_iter - iterations())
        optimizer.step(closure)  # resumes with the curvature pairs of the previous steps
        norm = gradient_norm(model, x, y, weight_decay)
    with torch.no_grad():
        value = objective(model, x, y, weight_decay).item()
    return Optimum(weight_decay, model, value, norm, iterations(), converged=norm <= tolerance)


def solve_path(x: torch.Tensor, y: torch.Tensor, weight_decays, max_iter: int, tolerance: float,
               solved: list[Optimum] = (), on_solved: Callable[[Optimum], None] | None = None) -> list[Optimum]:
    """Every weight decay's optimum, strongest first, each warm-started from the nearest stronger weight
    decay solved so far (``solved``: optima computed before, e.g. on a coarser grid). ``on_solved`` is
    called with each optimum as soon as it is found (solves take minutes on the full data)."""
    done, optima = list(solved), []
    for wd in sorted(weight_decays, reverse=True):
        stronger = [o for o in done if o.weight_decay > wd]
        start = min(stronger, key=lambda o: o.weight_decay).model if stronger else None
        optimum = solve(x, y, wd, max_iter, tolerance, start)
        if on_solved is not None:
            on_solved(optimum)
        done.append(optimum)
        optima.append(optimum)
    return optima


def finer_grid(weight_decays, best: float, per_decade: int) -> list[float]:
    """Weight decays between ``best`` and its neighbours in ``weight_decays``, evenly spaced in log scale
    at ``per_decade`` or more to a decade, that ``weight_decays`` lacks. An interval that ends at 0 has no
    log scale and is not refined.
    """
    grid = sorted(w for w in weight_decays if w > 0)
    if per_decade == 0 or best not in grid:
        return []
    i = grid.index(best)
    finer = []
    for low, high in itertools.pairwise(grid[max(i - 1, 0):i + 2]):
        steps = math.ceil(per_decade * math.log10(high / low) - 1e-9)  # 1e-9: log10(10) * 3 is 3.0000000000000004
        finer += [low * (high / low) ** (k / steps) for k in range(1, steps)]
    return finer


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).double().mean().item()
