"""Predict classes for image files of any size and colour, or for the test split."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.config import CLASS_NAMES, IMAGE_SIZE
from pipeline.core.metrics import predict_logits
from pipeline.errors import PipelineError


def image_to_array(path: Path) -> np.ndarray:
    """Any PNG/JPEG -> uint8 (28, 28) grey, light-on-dark like the dataset."""
    try:
        with Image.open(path) as img:
            grey = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the image ({e})")
    pixels = np.asarray(grey, dtype=np.uint8)
    # Fashion-MNIST shows light clothes on a black background; a photo usually has a light one.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return 255 - pixels if border.mean() > 127 else pixels


def top_k(model: torch.nn.Module, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable class names with their probabilities, for each image."""
    probs = F.softmax(predict_logits(model, images), dim=1)
    values, indices = probs.topk(k, dim=1)
    return [[(CLASS_NAMES[i], float(p)) for p, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]
