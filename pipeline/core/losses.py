"""The chapter's first lesson: softmax followed by log is numerically unstable.

softmax(o)_j = exp(o_j) / sum_k exp(o_k). For large logits exp overflows to inf (inf/inf = NaN); for
very negative ones it underflows to 0 and log(0) = -inf. Subtracting the max logit and folding the log
into the softmax gives the log-sum-exp form, which never exponentiates anything positive:

    log softmax(o)_j = (o_j - m) - log sum_k exp(o_k - m),  m = max_k o_k

``nn.CrossEntropyLoss`` does exactly this internally, which is why the concise model outputs logits.
"""

import torch


def naive_softmax(logits: torch.Tensor) -> torch.Tensor:
    exp = torch.exp(logits)
    return exp / exp.sum(dim=1, keepdim=True)


def naive_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log(softmax(o)_y), computed the way the from-scratch section first writes it."""
    probs = naive_softmax(logits)
    return -torch.log(probs[torch.arange(len(labels)), labels]).mean()


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))


def stable_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(o)_y in log-sum-exp form; matches ``F.cross_entropy``."""
    return -log_softmax(logits)[torch.arange(len(labels)), labels].mean()
