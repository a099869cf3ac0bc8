"""Predict classes for image files of any size and colour, or for the test split.

Fashion-MNIST's images are product photos turned grey, trimmed to the garment, the longer side resized
to 28 pixels and inverted: a light garment on a pure black background. A photo is brought to that look
(``image_to_array``), step by step:

1. transparency is composited onto white: a transparent pixel is background, whatever colour it stores;
2. grey, inverted when the border is light (a garment photographed on a lighter background);
3. the background (the border's median) is set to 0 and the brightest pixel to 255: a grey or coloured
   background would otherwise stay as a grey veil over the whole square, which the model reads as a bag;
4. cropped to the garment, padded to a square, resized to 28x28.

The model has only ever seen single garments on a plain background, so ``top_k`` always shows the three
most probable classes and ``unsure`` flags a prediction whose top probability is low.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import CLASS_NAMES, IMAGE_SIZE
from pipeline.core.metrics import predict_logits
from pipeline.errors import PipelineError

UNSURE_BELOW = 0.6  # a top probability under this is reported as unsure
GARMENT_LEVEL = 0.1  # after normalising, pixels above 10% of white count as garment (for the crop)


def flatten_onto_white(img: Image.Image) -> Image.Image:
    """RGB(A)/LA/P with transparency -> grey, the transparent parts white (step 1 and the grey of step 2)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L")


def border_of(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def remove_background(grey: np.ndarray) -> np.ndarray:
    """Light-on-dark, the border's level at 0 and the brightest pixel at 255 (steps 2 and 3)."""
    if border_of(grey).mean() > 127:
        grey = 255 - grey
    background = float(np.median(border_of(grey)))
    top = float(grey.max())
    if top - background < 16:
        raise ValueError("the image is blank (no garment stands out from its background)")
    scaled = (grey.astype(np.float32) - background) * (255.0 / (top - background))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def fit_to_square(pixels: np.ndarray) -> np.ndarray:
    """Crop to the garment, pad it to a centred square, resize to 28x28 (step 4)."""
    rows = np.flatnonzero((pixels > GARMENT_LEVEL * 255).any(axis=1))
    cols = np.flatnonzero((pixels > GARMENT_LEVEL * 255).any(axis=0))
    garment = Image.fromarray(pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    side = max(garment.size)
    square = ImageOps.pad(garment, (side, side), color=0)  # centred, black margins
    return np.asarray(square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def image_to_array(path: Path) -> np.ndarray:
    """Any PNG/JPEG -> uint8 (28, 28) grey, light garment on black like the dataset."""
    try:
        with Image.open(path) as img:
            grey = np.asarray(flatten_onto_white(img), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the image ({e})")
    try:
        return fit_to_square(remove_background(grey))
    except ValueError as e:
        raise PipelineError(f"{path}: {e}; give a photo of one garment on a plain background")


def top_k(model: torch.nn.Module, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable class names with their probabilities, for each image."""
    probs = F.softmax(predict_logits(model, images), dim=1)
    values, indices = probs.topk(k, dim=1)
    return [[(CLASS_NAMES[i], float(p)) for p, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def unsure(top: list[tuple[str, float]]) -> bool:
    """Whether the most probable class is too unlikely to be taken as the answer."""
    return top[0][1] < UNSURE_BELOW
