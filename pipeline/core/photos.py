"""Predict classes for image files of any size and colour, or for the test split.

Fashion-MNIST's images are product photos turned grey, trimmed to the garment, the longer side resized
to 28 pixels, padded to a square with the garment's box in the centre, and inverted: a light garment on
a pure black background. ``read_photo`` brings a photo to that look, step by step:

1. refuse an image whose header claims more than ``MAX_PHOTO_PIXELS`` pixels, before any is decoded
   (a small file can claim a huge image: a decompression bomb);
2. grey, transparency composited onto white (a transparent pixel is background, whatever colour it
   stores), resized so that the longer side is ``WORK_SIDE`` pixels: every photo is searched at the
   same scale (and shrinking a large one averages its pixels' noise);
3. a smoothed copy, used to find the garment, so that pixel noise and JPEG blocks cannot pass for it;
4. the background, estimated from the border: its level as a plane (a gradient is still background)
   and its spread, the noise and texture that the garment has to stand out from;
5. polarity: the garment is what differs from the background, lighter or darker; it is turned light
   on black, like the dataset;
6. the garment's pixels: those a few spreads above the background, in parts that reach far above it
   (hysteresis: a garment's faint edges stay, isolated noise goes); the largest such part, with the
   parts close to it (a sandal's straps), is the garment, everything else black;
7. cropped to the garment, padded to a centred square, resized to 28x28 and the brightest pixel
   stretched to 255, as the dataset's images are. A smaller garment, or one centred on its centre of
   mass, is to this linear model a different image: the dataset's own framing is what it knows.

The model has only ever seen single garments on a plain background, so ``top_k`` always shows the three
most probable classes and ``unsure_reasons`` says when a prediction should not be taken at its word: a
low top probability, or a photo in which the garment did not stand out clearly (``Evidence.doubts``).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from pipeline.config import CLASS_NAMES, IMAGE_SIZE
from pipeline.core.image_files import load_grey
from pipeline.core.metrics import predict_logits
from pipeline.errors import PipelineError

SMOOTHING = 1.0  # Gaussian sigma (pixels at the working size) against pixel noise and JPEG blocks
BORDER = 0.04  # the border band, as a fraction of the shorter side, that shows the background
MIN_SPREAD = 2.0  # grey levels: a noise-free background still has rounding and JPEG ringing
EDGE_SPREADS = 3.0  # a pixel this many spreads from the background may be garment...
CORE_SPREADS = 6.0  # ...if it is connected to one this many spreads from it
MIN_CONTRAST = 16.0  # grey levels: a garment that stands out less than this is no garment (blank image)
NEAR = 0.25  # parts within this fraction of the garment's size around it belong to it
MIN_PART = 0.02  # parts smaller than this fraction of the garment's mass are specks, ignored

# When a prediction is reported unsure. The three limits on the photo were set on photos made from
# validation images (``bench.photos.evaluate`` on the validation split), never on the benchmark's test
# garments: beyond what a garment cleanly found on those backgrounds shows.
UNSURE_BELOW = 0.6  # a top probability under this is reported as unsure
FILLS_FRAME = 0.85  # a garment covering more of the photo than this left no background to tell it by
COMPETING = 0.2  # another object with this fraction of the garment's mass: which one is the garment?
WEAK_CONTRAST = 4.0  # a garment whose typical contrast is under this many spreads barely stands out


@dataclass
class Evidence:
    """How clearly the garment stood out: what ``doubts`` judges a photo by."""

    coverage: float  # the fraction of the photo the garment covers
    rival: float  # the largest object left out, as a fraction of the garment's mass (0: none)
    contrast: float  # the garment's median difference from the background, in background spreads

    def doubts(self) -> list[str]:
        doubts = []
        if self.coverage > FILLS_FRAME:
            doubts.append("the garment fills the whole photo, with no background around it")
        if self.rival >= COMPETING:
            doubts.append("several objects stand out from the background")
        if self.contrast < WEAK_CONTRAST:
            doubts.append("the garment barely stands out from the background's noise")
        return doubts


@dataclass
class Photo:
    """A photo brought to the dataset's look, and what makes its garment doubtful (empty: nothing)."""

    pixels: np.ndarray  # uint8 (28, 28), a light garment on black
    evidence: Evidence

    @property
    def doubts(self) -> list[str]:
        return self.evidence.doubts()


def read_photo(path: Path) -> Photo:
    """Any PNG/JPEG -> the (28, 28) light-on-black garment the model reads, and how clear it was.

    The smoothed photo decides which pixels are the garment; their values come from the photo itself,
    which keeps the garment's detail.
    """
    grey = load_grey(path)  # steps 1 and 2
    smooth = ndimage.gaussian_filter(grey, SMOOTHING)  # 3
    background, spread = estimate_background(smooth)  # 4
    sign = polarity(smooth - background, spread)  # 5
    try:
        mask, evidence = garment_mask(np.clip(sign * (smooth - background), 0, None), spread)  # 6
    except ValueError as e:
        raise PipelineError(f"{path}: {e}; give a photo of one garment on a plain background")
    return Photo(fit_to_square(np.clip(sign * (grey - background), 0, None), mask, spread), evidence)  # 7


def image_to_array(path: Path) -> np.ndarray:
    """Any PNG/JPEG -> uint8 (28, 28) grey, light garment on black like the dataset."""
    return read_photo(path).pixels


# ---------------------------------------------------------------------------------------------------
# Steps 4-5: the background and the garment's polarity


def border_band(shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask of the pixels near the image's edges: where the background shows."""
    width = max(2, round(BORDER * min(shape)))
    band = np.ones(shape, dtype=bool)
    band[width:-width, width:-width] = False
    return band


def robust_spread(residuals: np.ndarray) -> float:
    """The standard deviation of the bulk of ``residuals`` (around 0), from their median absolute size."""
    return max(1.4826 * float(np.median(np.abs(residuals))), MIN_SPREAD)


def estimate_background(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """The background's level everywhere (a plane fitted to the border) and its spread around it.

    The fit starts from the border's median and is redone on the border pixels close to the last fit:
    a garment touching the border, even over a third of it, must not tilt or lift the background.
    """
    rows, cols = np.nonzero(border_band(grey.shape))
    values = grey[rows, cols]
    design = np.column_stack([np.ones(len(values)), rows / grey.shape[0], cols / grey.shape[1]])
    coef = np.array([np.median(values), 0.0, 0.0])
    for _ in range(3):
        residuals = values - design @ coef
        keep = np.abs(residuals) < 3 * robust_spread(residuals)
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
    spread = robust_spread((values - design @ coef)[keep])
    r, c = np.mgrid[0:grey.shape[0], 0:grey.shape[1]]
    level = coef[0] + coef[1] * r / grey.shape[0] + coef[2] * c / grey.shape[1]
    return level.astype(np.float32), spread


def polarity(difference: np.ndarray, spread: float) -> float:
    """+1 if the garment is lighter than the background, -1 if darker (step 5).

    Decided by the pixels that clearly differ from the background: the larger total difference wins.
    """
    clear = np.abs(difference) > CORE_SPREADS * spread
    return 1.0 if difference[clear].sum() >= 0 else -1.0


# ---------------------------------------------------------------------------------------------------
# Step 6: which pixels are the garment


def garment_mask(garment: np.ndarray, spread: float) -> tuple[np.ndarray, Evidence]:
    """The garment's pixels (the largest object and the parts near it), and how clearly it stood out."""
    blank = ValueError("the image is blank (no garment stands out from its background)")
    parts, count = ndimage.label(garment > EDGE_SPREADS * spread, structure=np.ones((3, 3)))  # 8-connected
    if count == 0:
        raise blank
    index = np.arange(1, count + 1)
    mass = ndimage.sum(garment, parts, index)
    # hysteresis: a part is an object only if some pixel of it clearly stands out
    is_object = ndimage.maximum(garment, parts, index) > max(CORE_SPREADS * spread, MIN_CONTRAST)
    if not is_object.any():
        raise blank
    main = int(np.argmax(np.where(is_object, mass, 0)))
    # the parts around the largest object belong to it (a sandal's straps, a faint sole), specks excepted
    boxes = ndimage.find_objects(parts)
    near = grown(boxes[main], NEAR, garment.shape)
    chosen = [i for i in range(count) if mass[i] >= MIN_PART * mass[main] and overlaps(boxes[i], near)]
    mask = np.isin(parts, index[chosen])
    others = np.delete(np.where(is_object, mass, 0), chosen)
    evidence = Evidence(coverage=float(mask.mean()), rival=float(others.max(initial=0) / mass[main]),
                        contrast=float(np.median(garment[mask]) / spread))
    return mask, evidence


def grown(box: tuple[slice, slice], fraction: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    """``box`` enlarged on every side by ``fraction`` of its own height and width, within the image."""
    out = []
    for s, limit in zip(box, shape):
        margin = round(fraction * (s.stop - s.start))
        out.append(slice(max(0, s.start - margin), min(limit, s.stop + margin)))
    return tuple(out)


def overlaps(box: tuple[slice, slice], outer: tuple[slice, slice]) -> bool:
    """Whether ``box`` overlaps ``outer``."""
    return all(b.start < o.stop and o.start < b.stop for b, o in zip(box, outer))


# ---------------------------------------------------------------------------------------------------
# Step 7: the dataset's framing


def fit_to_square(garment: np.ndarray, mask: np.ndarray, spread: float) -> np.ndarray:
    """Crop to the garment, pad it to a centred square, resize that to 28x28, stretch to 0..255."""
    # the box: the garment's own pixels above the threshold (the smoothed copy spreads it a little wider)
    inside = mask & (garment > EDGE_SPREADS * spread)
    rows, cols = np.nonzero(inside if inside.any() else mask)
    kept = garment * ndimage.binary_dilation(mask, iterations=2)  # the soft edge just outside the threshold
    crop = kept[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.float32)  # padded at full resolution: centred to a fraction of a pixel
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    small = Image.fromarray(square).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.clip(np.asarray(small, dtype=np.float32), 0, None)
    return (pixels * (255.0 / max(float(pixels.max()), 1e-6))).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# The model's answer


def top_k(model: torch.nn.Module, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable class names with their probabilities, for each image."""
    probs = F.softmax(predict_logits(model, images), dim=1)
    values, indices = probs.topk(k, dim=1)
    return [[(CLASS_NAMES[i], float(p)) for p, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def unsure_reasons(top: list[tuple[str, float]], doubts: list[str] = ()) -> list[str]:
    """Why the most probable class should not be taken as the answer (empty: it can be)."""
    low = [f"top probability below {UNSURE_BELOW}"] if top[0][1] < UNSURE_BELOW else []
    return low + list(doubts)


def unsure(top: list[tuple[str, float]], doubts: list[str] = ()) -> bool:
    return bool(unsure_reasons(top, doubts))
