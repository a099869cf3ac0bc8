"""The models ``model`` chooses from, one builder each: ``softmax`` (d2l §3.7) and ``mlp`` (d2l §4.3).

A builder takes the training settings and returns an ``nn.Module`` that maps a batch of images
(N, 1, 28, 28) to one logit per class (N, 10); the softmax lives in the loss. ``build_model`` seeds
torch first, so the same settings give the same initial weights. Everything downstream (training,
tuning, evaluation, the registry, serving) takes any such module: a model is logged as a pt2 archive,
which loads without this code.

Adding a model: a function below with the ``@builder`` decorator, named as the model, and its line in
``pipeline/config.py`` MODELS (docs/models.md).
"""

from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import IMAGE_SIZE, NUM_CLASSES, TrainConfig

BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {}


def builder(function: Callable[[TrainConfig], nn.Module]) -> Callable[[TrainConfig], nn.Module]:
    """Make ``function`` the builder of the model named as it is."""
    BUILDERS[function.__name__] = function
    return function


def init_weights(module: nn.Module) -> None:
    # The book draws weights from N(0, 0.01^2); biases keep PyTorch's default init.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.01)


@builder
def softmax(cfg: TrainConfig) -> nn.Module:
    """d2l §3.7: ``nn.Sequential(nn.Flatten(), nn.Linear(784, 10))``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES))


@builder
def mlp(cfg: TrainConfig) -> nn.Module:
    """d2l §4.3 (concise): one hidden layer of ``hidden_units`` ReLUs (256 in the book), and dropout after it
    while training (d2l §4.6; 0 = none, the §4.3 model)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, cfg.hidden_units), nn.ReLU(),
                         nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_units, NUM_CLASSES))


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model ``cfg.model`` with the book's initialisation, seeded by ``cfg.seed``."""
    if cfg.model not in BUILDERS:
        raise ValueError(f"no builder for model {cfg.model!r} in pipeline/core/models.py (builders: "
                         f"{', '.join(BUILDERS)})")
    torch.manual_seed(cfg.seed)
    model = BUILDERS[cfg.model](cfg)
    model.apply(init_weights)
    return model


def parameter_count(model: nn.Module) -> int:
    """How many numbers training sets: 7,850 for the softmax regression."""
    return sum(p.numel() for p in model.parameters())
