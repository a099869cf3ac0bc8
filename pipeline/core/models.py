"""The model of d2l §3.7: softmax regression is one linear layer; the softmax lives in the loss."""

import torch
from torch import nn

from pipeline.config import IMAGE_SIZE, NUM_CLASSES


def init_weights(module: nn.Module) -> None:
    # The book draws weights from N(0, 0.01^2); biases keep PyTorch's default init.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.01)


def build_model(seed: int) -> nn.Sequential:
    """``nn.Sequential(nn.Flatten(), nn.Linear(784, 10))`` with the book's initialisation, seeded."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, NUM_CLASSES))
    model.apply(init_weights)
    return model
